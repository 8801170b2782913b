"""Triton row step of the chunked linear cross-entropy: one program per row, two passes over the vocabulary.

Pass 1 keeps a running max m and sum s = sum exp(z - m) per lane (rescaled by exp(m_old - m_new) when the max
grows), so lse = m + log(s) costs one read of the row. Pass 2 rewrites the row in place with its gradient
(softmax(z) - onehot(target)) * scale. Against the same step in PyTorch ops (an fp32 copy, logsumexp, sub,
exp, scatter, mul, cast: ~10 passes over [rows, vocab] fp32), this reads the bf16 logits twice and writes them once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import launch

BLOCK = 2048  # vocabulary columns per iteration
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _xent_rows_kernel(z, targets, scale, loss, V, ignore_index, WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    zr = z + row.to(tl.int64) * V
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, V, BLOCK):
        x = tl.load(zr + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)  # lanes with no column yet keep s = 0, no NaN
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
    tgt = tl.load(targets + row)
    valid = tgt != ignore_index
    tgt = tl.maximum(tgt, 0)
    picked = tl.load(zr + tgt).to(tl.float32)
    tl.store(loss + row, tl.where(valid, lse - picked, 0.0))
    if WITH_GRAD:
        c = tl.where(valid, tl.load(scale), 0.0)
        for v0 in range(0, V, BLOCK):
            idx = v0 + cols
            x = tl.load(zr + idx, mask=idx < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(idx == tgt, 1.0, 0.0)) * c
            tl.store(zr + idx, g.to(z.dtype.element_ty), mask=idx < V)


def xent_rows_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, scale: torch.Tensor,
               with_grad: bool) -> torch.Tensor:  # fmt: skip
    """`reference.xent_rows_` in one launch: logits [n, vocab] contiguous (bf16, fp16 or fp32), targets [n]
    int64, scale a 0-dim fp32 tensor on the logits' device; returns the fp32 per-row loss."""
    n, V = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    launch(_xent_rows_kernel, (n,), logits, targets, scale, loss, V, ignore_index, WITH_GRAD=with_grad,
           BLOCK=BLOCK, num_warps=8)  # fmt: skip
    return loss
