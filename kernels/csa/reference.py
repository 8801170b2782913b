"""PyTorch reference for compressed sparse attention (CSA), layout [B, T, H, D].

For query t (H query heads; query head h reads KV head h // (H / Hkv), no repeated K/V in memory):

    comp_t  = softmax_j(scale q_t . kc_j  over j with t >= stride (j + 1)) vc       (1)
    local_t = softmax_s(scale q_t . k_s   over t - window + 1 <= s <= t) v           (2)
    o_t     = blend_t * comp_t + (1 - blend_t) * local_t                              (3)

Compressed block j covers tokens [stride j, stride (j + 1)) and is visible only once finished. A row
with no visible block (t < stride) takes comp_t = 0 by definition. Neither path builds a T x T mask:
(1) uses a [T, T/stride] visibility test made from two aranges, (2) works on blocks of `window`
queries against the keys of their own and the previous block (O(T * 2 window) scores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.common import compute_dtype, without_autocast
from kernels.rope import apply_rope, rope_tables

Tensor = torch.Tensor


def compressed_attention(q: Tensor, kc: Tensor, vc: Tensor, stride: int, scale: float) -> Tensor:
    """Path (1). q [B, T, H, D], kc/vc [B, Tc, Hkv, D] -> [B, T, H, D]; rows t < stride are 0."""
    B, T, H, D = q.shape
    Tc, Hkv = kc.shape[1], kc.shape[2]
    qg = q.view(B, T, Hkv, H // Hkv, D)
    scores = torch.einsum("btkgd,bjkd->bkgtj", qg, kc) * scale
    t = torch.arange(T, device=q.device)
    visible = t[:, None] >= stride * (torch.arange(Tc, device=q.device)[None, :] + 1)
    has_block = t >= stride
    # Rows without a visible block get a harmless all-visible softmax (no NaN in forward or backward)
    # and are then zeroed, so their value and gradient are exactly 0.
    p = scores.masked_fill(~(visible | ~has_block[:, None]), float("-inf")).softmax(-1)
    out = torch.einsum("bkgtj,bjkd->btkgd", p, vc).reshape(B, T, H, D)
    return torch.where(has_block[None, :, None, None], out, 0.0)


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float) -> Tensor:
    """Path (2). q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D], keys t - window + 1 .. t."""
    B, T, H, D = q.shape
    Hkv, W = k.shape[2], window
    n = -(-T // W)  # query blocks of W rows
    pad = n * W - T
    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).view(B, n, W, Hkv, H // Hkv, D)
    # keys padded by one block in front: block i sees key slots [i W - W, i W + W)
    kb, vb = (F.pad(x, (0, 0, 0, 0, W, pad)).unfold(1, 2 * W, W) for x in (k, v))  # [B, n, Hkv, D, 2W]
    r = torch.arange(W, device=q.device)[:, None]  # query row in its block
    w = torch.arange(2 * W, device=q.device)[None, :]  # key slot; key position s = i W + w - W
    i = torch.arange(n, device=q.device)[:, None, None]
    visible = (w >= r + 1) & (w <= r + W) & (i * W + w - W >= 0)  # [n, W, 2W]
    scores = torch.einsum("bnrkgd,bnkdw->bnkgrw", qb, kb) * scale
    p = scores.masked_fill(~visible[None, :, None, None], float("-inf")).softmax(-1)
    out = torch.einsum("bnkgrw,bnkdw->bnrkgd", p, vb)
    return out.reshape(B, n * W, H, D)[:, :T]


@without_autocast
def csa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kc: Tensor,
    vc: Tensor,
    blend: Tensor,
    window: int = 64,
    stride: int = 4,
    scale: float | None = None,
) -> Tensor:
    """Blend (3) of the compressed (1) and sliding-window (2) paths; output in q's dtype.

    q [B, T, H, D]; k, v [B, T, Hkv, D]; kc, vc [B, ceil(T / stride), Hkv, D]; blend [B, T, H * D]
    (already through the sigmoid). Computed in fp32 (fp64 for fp64 inputs).
    """
    B, T, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    dt, out_dtype = compute_dtype(q), q.dtype
    q, k, v, kc, vc, blend = (x.to(dt) for x in (q, k, v, kc, vc, blend))
    comp = compressed_attention(q, kc, vc, stride, scale)
    local = sliding_window_attention(q, k, v, window, scale)
    blend = blend.view(B, T, H, D)
    return torch.lerp(local, comp, blend).to(out_dtype)


def compress_kv(
    k: Tensor,
    v: Tensor,
    weight_k: Tensor,
    weight_v: Tensor,
    stride: int = 4,
    rotary_dim: int = 32,
    theta: float = 20000.0,
) -> tuple[Tensor, Tensor]:
    """Compressor: mean over blocks of `stride` tokens, a linear map mixing KV heads, RoPE on keys.

    k [B, T, Hkv, D] is taken after k_norm and before RoPE, v raw. Both are flattened to
    [B, T, Hkv * D], zero-padded to a multiple of `stride` in T, averaged per block, and mapped by
    weight_k / weight_v [Hkv * D, Hkv * D] (x @ W^T). Compressed key j gets RoPE at position
    stride * j + stride // 2. Returns kc, vc [B, ceil(T / stride), Hkv, D].
    """
    B, T, Hkv, D = k.shape
    Tc = -(-T // stride)
    pad = Tc * stride - T

    def pool(x: Tensor) -> Tensor:
        return F.pad(x.reshape(B, T, Hkv * D), (0, 0, 0, pad)).view(B, Tc, stride, Hkv * D).mean(2)

    kc = F.linear(pool(k), weight_k).view(B, Tc, Hkv, D)
    vc = F.linear(pool(v), weight_v).view(B, Tc, Hkv, D)
    positions = torch.arange(Tc, device=k.device) * stride + stride // 2
    cos, sin = rope_tables(positions, rotary_dim, theta, dtype=compute_dtype(kc))
    return apply_rope(kc, cos, sin), vc
