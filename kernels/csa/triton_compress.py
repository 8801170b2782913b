"""Fused Triton compressor for CSA, forward and backward (the math of `reference.compress_kv`).

For compressed row j of batch b (tokens stride j .. stride j + stride - 1, zero past T):

    x_j  = (1 / stride) sum_s x[stride j + s]           (mean over the block, [Hkv D] wide)
    a_j  = x_j W^T                                      (W: [Hkv D, Hkv D], mixes heads)
    kc_j = a_j cos_j + rotate_half(a_j) sin_j           (keys only; RoPE at position stride j + stride // 2)

One program owns BLOCK_J compressed rows of either the keys or the values (grid axis 1): the block means
are one [BLOCK_J, Hkv D] tile (padded to a power of two), each output head one product with W's rows of
that head. rotate_half is a signed gather of columns (`_rope_parts`): in the forward it gathers W's rows
(a second product), in the backward the gradient's columns, da = g cos - rotate_half(g sin).

Backward (one launch + one batched matmul): da of both paths (saved for dW) and dx = da W / stride,
written to each of the block's `stride` source rows; dW = da^T x over all rows is one torch.bmm with the
block means saved by the forward.
"""

import functools

import torch
import triton
import triton.language as tl

from kernels.common import cdiv, launch
from kernels.rope import rope_tables


@triton.jit
def _rope_parts(offs_d, R: tl.constexpr):
    """RoPE's rotate_half on the first R columns as a gather: rotate_half(x)[c] = sign(c) x[partner(c)],
    partner(c) = c + R/2 with sign -1 for c < R/2, c - R/2 with sign +1 for R/2 <= c < R, sign 0 past R
    (cos and sin of column c and of its partner are equal)."""
    partner = tl.where(offs_d < R // 2, offs_d + R // 2, tl.where(offs_d < R, offs_d - R // 2, offs_d))
    sign = tl.where(offs_d < R // 2, -1.0, tl.where(offs_d < R, 1.0, 0.0))
    return partner, sign


@triton.jit
def _rope_factors(COS, SIN, j, in_r, offs_d, R: tl.constexpr):
    """Partner columns, cos and sign-folded sin [rows, D] of compressed rows j (the tables hold position
    stride j + stride // 2): rotate_half(x) * sin = x[:, partner] * sin; cos 1 and sin 0 past R."""
    partner, sign = _rope_parts(offs_d, R)
    cs_offs = j[:, None] * R + offs_d[None, :]
    in_rot = in_r[:, None] & (offs_d[None, :] < R)
    cos = tl.load(COS + cs_offs, mask=in_rot, other=1.0)
    sin = tl.load(SIN + cs_offs, mask=in_rot, other=0.0) * sign[None, :]
    return partner, cos, sin


@triton.jit
def _compress_rows(
    X, W, Y, XM, COS, SIN, pid, T, Tc, n_rows,
    ROPE: tl.constexpr, SAVE: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HDP: tl.constexpr,
    STRIDE: tl.constexpr, R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Y[rows] = (RoPE of) mean_stride(X) W^T for compressed rows pid BLOCK_J .. (flattened over b, j);
    with SAVE also the block means XM [n_rows, HKV D] for the backward. The block means are one
    [BLOCK_J, HDP] tile (HKV D columns padded to a power of two); each output head is one product with
    W's rows of that head. rotate_half(a) of a = x W^T is x W_p^T with W_p's rows gathered by
    `_rope_parts`: a second product, no shuffle of a in registers."""
    rows = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    in_r = rows < n_rows
    b, j = rows // Tc, rows % Tc
    cols = tl.arange(0, HDP)
    in_c = cols < HKV * D
    xm = tl.zeros([BLOCK_J, HDP], dtype=tl.float32)
    src = X + (b.to(tl.int64) * T + STRIDE * j)[:, None] * (HKV * D) + cols[None, :]  # the block's first token
    for s in tl.static_range(STRIDE):
        ok = in_r & (STRIDE * j + s < T)
        xm += tl.load(src + s * HKV * D, mask=ok[:, None] & in_c[None, :], other=0.0)
    xm = (xm * (1.0 / STRIDE)).to(X.dtype.element_ty)  # the mean in the inputs' dtype, as the matmul sees it
    if SAVE:
        tl.store(XM + rows[:, None] * (HKV * D) + cols[None, :], xm, mask=in_r[:, None] & in_c[None, :])
    offs_d = tl.arange(0, D)
    if ROPE:
        partner, cos, sin = _rope_factors(COS, SIN, j, in_r, offs_d, R)
    for ho in tl.static_range(HKV):
        w = tl.load(W + (ho * D + offs_d[:, None]) * (HKV * D) + cols[None, :], mask=in_c[None, :], other=0.0)
        acc = tl.dot(xm, tl.trans(w.to(xm.dtype)))
        if ROPE:
            w_p = tl.load(W + (ho * D + partner[:, None]) * (HKV * D) + cols[None, :], mask=in_c[None, :],
                          other=0.0)
            acc = acc * cos + tl.dot(xm, tl.trans(w_p.to(xm.dtype))) * sin
        tl.store(Y + rows[:, None] * (HKV * D) + ho * D + offs_d[None, :], acc.to(Y.dtype.element_ty),
                 mask=in_r[:, None])


@triton.jit
def _compress_fwd(
    K, V, WK, WV, KC, VC, XM, COS, SIN, T, Tc, n_rows,
    SAVE: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HDP: tl.constexpr, STRIDE: tl.constexpr,
    R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid = tl.program_id(0)
    if tl.program_id(1) == 0:
        _compress_rows(K, WK, KC, XM, COS, SIN, pid, T, Tc, n_rows, True, SAVE, HKV, D, HDP, STRIDE, R,
                       BLOCK_J)
    else:
        _compress_rows(V, WV, VC, XM + n_rows * HKV * D, COS, SIN, pid, T, Tc, n_rows, False, SAVE, HKV, D,
                       HDP, STRIDE, R, BLOCK_J)


@triton.jit
def _compress_bwd_rows(
    G, W, DX, DA, COS, SIN, pid, T, Tc, n_rows,
    ROPE: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HDP: tl.constexpr, STRIDE: tl.constexpr,
    R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """da = dY through the RoPE (stored for dW), dx = da W / stride into each source row of the block.
    Through the RoPE: da = g cos - rotate_half(g sin), i.e. da[c] = g[c] cos[c] - sign(c) g[partner(c)]
    sin[c] (the transpose of the gather is the gather with the opposite sign)."""
    rows = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    in_r = rows < n_rows
    b, j = rows // Tc, rows % Tc
    offs_d = tl.arange(0, D)
    cols = tl.arange(0, HDP)
    in_c = cols < HKV * D
    if ROPE:
        partner, cos, sin = _rope_factors(COS, SIN, j, in_r, offs_d, R)
    dx = tl.zeros([BLOCK_J, HDP], dtype=tl.float32)
    for ho in tl.static_range(HKV):
        g_rows = G + rows[:, None] * (HKV * D) + ho * D
        da = tl.load(g_rows + offs_d[None, :], mask=in_r[:, None], other=0.0).to(tl.float32)
        if ROPE:
            g_p = tl.load(g_rows + partner[None, :], mask=in_r[:, None], other=0.0).to(tl.float32)
            da = da * cos - g_p * sin
        da = da.to(DA.dtype.element_ty)
        tl.store(DA + rows[:, None] * (HKV * D) + ho * D + offs_d[None, :], da, mask=in_r[:, None])
        w = tl.load(W + (ho * D + offs_d[:, None]) * (HKV * D) + cols[None, :], mask=in_c[None, :], other=0.0)
        dx += tl.dot(da, w.to(da.dtype))
    dx = (dx * (1.0 / STRIDE)).to(DX.dtype.element_ty)
    dst = DX + (b.to(tl.int64) * T + STRIDE * j)[:, None] * (HKV * D) + cols[None, :]
    for s in tl.static_range(STRIDE):
        ok = in_r & (STRIDE * j + s < T)
        tl.store(dst + s * HKV * D, dx, mask=ok[:, None] & in_c[None, :])


@triton.jit
def _compress_bwd(
    DKC, DVC, WK, WV, DK, DV, DA, COS, SIN, T, Tc, n_rows,
    HKV: tl.constexpr, D: tl.constexpr, HDP: tl.constexpr, STRIDE: tl.constexpr, R: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid = tl.program_id(0)
    if tl.program_id(1) == 0:
        _compress_bwd_rows(DKC, WK, DK, DA, COS, SIN, pid, T, Tc, n_rows, True, HKV, D, HDP, STRIDE, R,
                           BLOCK_J)
    else:
        _compress_bwd_rows(DVC, WV, DV, DA + n_rows * HKV * D, COS, SIN, pid, T, Tc, n_rows, False, HKV, D,
                           HDP, STRIDE, R, BLOCK_J)


CONFIG = dict(BLOCK_J=32, num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=16)
def _tables(Tc: int, stride: int, rotary_dim: int, theta: float, device: torch.device):
    """RoPE cos, sin [Tc, rotary_dim] (fp32) at positions stride j + stride // 2, as the reference has them."""
    positions = torch.arange(Tc, device=device) * stride + stride // 2
    return tuple(t.contiguous() for t in rope_tables(positions, rotary_dim, theta, torch.float32))


def compress_fwd(
    k: torch.Tensor, v: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, stride: int, rotary_dim: int,
    theta: float, save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kc, vc [B, Tc, Hkv, D] from contiguous k, v [B, T, Hkv, D] and weights; with `save` also the block
    means [2, B Tc, Hkv D] (keys, values) for the backward, else an empty tensor."""
    B, T, Hkv, D = k.shape
    Tc = cdiv(T, stride)
    n_rows = B * Tc
    kc = k.new_empty(B, Tc, Hkv, D)
    vc = v.new_empty(B, Tc, Hkv, D)
    xm = k.new_empty(2, n_rows, Hkv * D) if save else k.new_empty(0)
    cos, sin = _tables(Tc, stride, rotary_dim, float(theta), k.device)
    launch(
        _compress_fwd, (cdiv(n_rows, CONFIG["BLOCK_J"]), 2, 1), k, v, wk, wv, kc, vc, xm, cos, sin, T, Tc,
        n_rows, SAVE=save, HKV=Hkv, D=D, HDP=triton.next_power_of_2(Hkv * D), STRIDE=stride, R=rotary_dim,
        **CONFIG,
    )
    return kc, vc, xm


def compress_bwd(
    dkc: torch.Tensor, dvc: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, xm: torch.Tensor, T: int,
    stride: int, rotary_dim: int, theta: float,
) -> tuple[torch.Tensor, ...]:
    """dk, dv [B, T, Hkv, D] and dwk, dwv from the output gradients and the saved block means."""
    dkc, dvc = dkc.contiguous(), dvc.contiguous()
    B, Tc, Hkv, D = dkc.shape
    n_rows = B * Tc
    dk = dkc.new_empty(B, T, Hkv, D)
    dv = dvc.new_empty(B, T, Hkv, D)
    da = xm.new_empty(2, n_rows, Hkv * D)
    cos, sin = _tables(Tc, stride, rotary_dim, float(theta), dkc.device)
    launch(
        _compress_bwd, (cdiv(n_rows, CONFIG["BLOCK_J"]), 2, 1), dkc, dvc, wk, wv, dk, dv, da, cos, sin,
        T, Tc, n_rows, HKV=Hkv, D=D, HDP=triton.next_power_of_2(Hkv * D), STRIDE=stride, R=rotary_dim, **CONFIG,
    )
    dwk, dwv = torch.bmm(da.transpose(1, 2), xm).unbind(0)  # dW = da^T x, both paths in one product
    return dk, dv, dwk.to(wk.dtype), dwv.to(wv.dtype)


class _CompressFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, wk, wv, stride, rotary_dim, theta):
        kc, vc, xm = compress_fwd(k, v, wk, wv, stride, rotary_dim, theta, True)
        ctx.save_for_backward(wk, wv, xm)
        ctx.args = k.shape[1], stride, rotary_dim, theta
        return kc, vc

    @staticmethod
    def backward(ctx, dkc, dvc):
        wk, wv, xm = ctx.saved_tensors
        return (*compress_bwd(dkc, dvc, wk, wv, xm, *ctx.args), None, None, None)


def compress_kv_triton(
    k: torch.Tensor, v: torch.Tensor, weight_k: torch.Tensor, weight_v: torch.Tensor, stride: int,
    rotary_dim: int, theta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused compressor behind `kernels.csa.compress_kv(..., backend="triton")` (shapes checked there).

    v and the weights are used in k's dtype for the products (fp32 accumulation); the weight gradients
    come back in the weights' dtype.
    """
    dtypes = {k.dtype, v.dtype, weight_k.dtype, weight_v.dtype}
    if k.shape[-1] not in (16, 32, 64, 128) or not dtypes <= _DTYPES:
        check_inputs(k, v, weight_k, weight_v)  # raises the precise ValueError
    if v.dtype != k.dtype:
        v = v.to(k.dtype)
    k, v = k.contiguous(), v.contiguous()
    weight_k, weight_v = weight_k.contiguous(), weight_v.contiguous()
    save = torch.is_grad_enabled() and (
        k.requires_grad or v.requires_grad or weight_k.requires_grad or weight_v.requires_grad
    )
    if save:
        return _CompressFunction.apply(k, v, weight_k, weight_v, stride, rotary_dim, theta)
    kc, vc, _ = compress_fwd(k, v, weight_k, weight_v, stride, rotary_dim, theta, False)
    return kc, vc


_DTYPES = {torch.float16, torch.bfloat16, torch.float32}


def check_inputs(k: torch.Tensor, *others: torch.Tensor) -> None:
    """What the kernels need beyond `compress_kv`'s shape checks: head dim and dtypes (ValueError)."""
    if k.shape[-1] not in (16, 32, 64, 128):
        raise ValueError(f"triton compressor supports head dims (16, 32, 64, 128), got {k.shape[-1]}")
    for x in (k, *others):
        if x.dtype not in _DTYPES:
            raise ValueError(f"triton compressor supports dtypes fp16/bf16/fp32, got {x.dtype}")
