"""Triton causal depthwise conv + SiLU on the [B, T, C] layout, forward and backward (see reference.py).

Forward, per (time tile, channel tile, batch) program: W shifted loads of x, z = sum_i w_i x[t - W + 1 + i],
y = silu(z). Backward, same grid, recomputing z instead of saving it:
    dz[t]  = dy[t] * silu'(z[t]),          silu'(z) = s (1 + z (1 - s)),  s = sigmoid(z)
    dx[t]  = sum_j w_{W-1-j} dz[t + j]     (z recomputed at the W rows t .. t + W - 1)
    dw_i  += sum_t dz[t] x[t - W + 1 + i]  (per-program partial sums, reduced in a fixed order: deterministic)
Registered as torch.library custom ops (`hyla::conv_silu_fwd` / `hyla::conv_silu_bwd`) with fake
implementations and an autograd formula, so torch.compile(fullgraph=True) keeps them as single kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor
# (time rows, channels, warps) per program; bwd holds ~20 tiles live, so it takes fewer rows (ptxas: 137
# registers at 8 x 128 on 4 warps, spills from 32 x 128). bench/conv.py sweeps these.
CONFIG = {"fwd": (16, 128, 4), "bwd": (8, 128, 4)}
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _conv_at(x_ptr, w_ptr, rows, cols, T, C, W: tl.constexpr):
    """z[rows, cols] = sum_i w[cols, i] x[rows - W + 1 + i, cols] in fp32 (x rows < 0 read as 0)."""
    z = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    for i in tl.static_range(W):
        src = rows - (W - 1) + i
        ok = ((src >= 0) & (src < T))[:, None] & (cols < C)[None, :]
        xi = tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        wi = tl.load(w_ptr + cols * W + i, mask=cols < C, other=0.0).to(tl.float32)
        z += xi * wi[None, :]
    return z


@triton.jit
def _conv_silu_fwd_kernel(x, w, y, T, C, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    base = i_b.to(tl.int64) * T * C
    rows, cols = i_t * BT + tl.arange(0, BT), i_c * BC + tl.arange(0, BC)
    z = _conv_at(x + base, w, rows, cols, T, C, W)
    mask = (rows < T)[:, None] & (cols < C)[None, :]
    tl.store(y + base + rows[:, None] * C + cols[None, :], (z * tl.sigmoid(z)).to(y.dtype.element_ty), mask=mask)


@triton.jit
def _conv_silu_bwd_kernel(x, w, dy, dx, dw_part, T, C, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    base = i_b.to(tl.int64) * T * C
    rows, cols = i_t * BT + tl.arange(0, BT), i_c * BC + tl.arange(0, BC)
    dx_acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):  # dz at rows t + j feeds dx[t] through w_{W-1-j}
        rj = rows + j
        z = _conv_at(x + base, w, rj, cols, T, C, W)
        ok = (rj < T)[:, None] & (cols < C)[None, :]
        s = tl.sigmoid(z)
        dz = tl.load(dy + base + rj[:, None] * C + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dz = dz * s * (1 + z * (1 - s))
        wj = tl.load(w + cols * W + (W - 1 - j), mask=cols < C, other=0.0).to(tl.float32)
        dx_acc += dz * wj[None, :]
        if j == 0:  # this tile's own dz: partial dw sums
            part = dw_part + ((i_b * tl.num_programs(0) + i_t) * C).to(tl.int64) * W
            for i in tl.static_range(W):
                src = rows - (W - 1) + i
                ok_src = ((src >= 0) & (src < T))[:, None] & (cols < C)[None, :]
                xi = tl.load(x + base + src[:, None] * C + cols[None, :], mask=ok_src, other=0.0).to(tl.float32)
                tl.store(part + cols * W + i, tl.sum(dz * xi, 0), mask=cols < C)
    mask = (rows < T)[:, None] & (cols < C)[None, :]
    tl.store(dx + base + rows[:, None] * C + cols[None, :], dx_acc.to(dx.dtype.element_ty), mask=mask)


def conv_silu_fwd(x: Tensor, w: Tensor) -> Tensor:
    """x [B, T, C] contiguous, w [C, W] contiguous -> silu(causal depthwise conv) [B, T, C] in x's dtype."""
    (B, T, C), (bt, bc, warps) = x.shape, CONFIG["fwd"]
    y = torch.empty_like(x)
    _conv_silu_fwd_kernel[triton.cdiv(T, bt), triton.cdiv(C, bc), B](x, w, y, T, C, w.shape[1], bt, bc,
                                                                     num_warps=warps)  # fmt: skip
    return y


def conv_silu_bwd(x: Tensor, w: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """(dx [B, T, C] in x's dtype, dw [C, W] in w's dtype) for the gradient dy of conv_silu_fwd(x, w)."""
    (B, T, C), (bt, bc, warps) = x.shape, CONFIG["bwd"]
    nt = triton.cdiv(T, bt)
    dx = torch.empty_like(x)
    dw_part = torch.empty(B * nt, *w.shape, device=x.device, dtype=torch.float32)
    _conv_silu_bwd_kernel[nt, triton.cdiv(C, bc), B](x, w, dy, dx, dw_part, T, C, w.shape[1], bt, bc,
                                                     num_warps=warps)  # fmt: skip
    return dx, dw_part.sum(0).to(w.dtype)


@torch.library.custom_op("hyla::conv_silu_fwd", mutates_args=())
def _fwd_op(x: Tensor, w: Tensor) -> Tensor:
    return conv_silu_fwd(x, w)


@_fwd_op.register_fake
def _(x, w):
    return torch.empty_like(x)


@torch.library.custom_op("hyla::conv_silu_bwd", mutates_args=())
def _bwd_op(x: Tensor, w: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    return conv_silu_bwd(x, w, dy)


@_bwd_op.register_fake
def _(x, w, dy):
    return torch.empty_like(x), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    return torch.ops.hyla.conv_silu_bwd(*ctx.saved_tensors, dy.contiguous())


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def triton_causal_conv1d_silu(x: Tensor, weight: Tensor) -> Tensor:
    """silu(causal depthwise conv) with zero left context by the Triton kernels; inputs validated by
    `kernels.conv.causal_conv1d_silu`. Non-contiguous inputs are copied."""
    return torch.ops.hyla.conv_silu_fwd(x.contiguous(), weight.contiguous())
