"""Triton causal depthwise conv + SiLU on the [B, T, C] layout, forward and backward (see reference.py).

Forward, per (time tile, channel tile, batch) program: W shifted tile loads of x,
z[t] = sum_i w_i x[t - W + 1 + i], y = silu(z). Backward (width W = 4, the model's), recomputing z:
    dz[t]  = dy[t] * silu'(z[t]),          silu'(z) = s (1 + z (1 - s)),  s = sigmoid(z)
    dx[t]  = sum_j w_{3-j} dz[t + j]
    dw_i  += sum_t dz[t] x[t - 3 + i]      (per-program partial sums, reduced in a fixed order: deterministic)
as a walk down each time segment that carries the last four x rows and the next three dz rows in
registers (shifted tiles would read every row 16 times: 2.2 ms at B32 on an H100, 0.11 of copy speed).
Registered as torch.library custom ops (`hyla::conv_silu_fwd` / `hyla::conv_silu_bwd`) with fake
implementations and an autograd formula, so torch.compile(fullgraph=True) keeps them as single kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor
# Per program: fwd (time rows, channels, warps); bwd (time segment walked row by row, channels, warps).
# From bench/conv.py --sweep on an H100 (B32, fwd+bwd): bwd (64, 64, 1) 0.80 ms, (64, 128, 1) 0.94 ms.
CONFIG = {"fwd": (16, 128, 4), "bwd": (64, 64, 1)}
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_WIDTH = 4  # the backward kernel carries exactly four x rows


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
def _row(x, r, cols, T, C):
    """Row r of a [T, C] tile in fp32, 0 outside 0 <= r < T."""
    return tl.load(x + r * C + cols, mask=(cols < C) & (r >= 0) & (r < T), other=0.0).to(tl.float32)


@triton.jit
def _dz_at(x, dy, w0, w1, w2, w3, r, cols, T, C):
    """dz[r] = dy[r] silu'(z[r]) for one row, z[r] recomputed from x[r - 3 .. r] (0 for r >= T)."""
    z = w0 * _row(x, r - 3, cols, T, C) + w1 * _row(x, r - 2, cols, T, C)
    z += w2 * _row(x, r - 1, cols, T, C) + w3 * _row(x, r, cols, T, C)
    s = tl.sigmoid(z)
    return _row(dy, r, cols, T, C) * s * (1 + z * (1 - s))


@triton.jit
def _conv_silu_bwd_kernel(x, w, dy, dx, dw_part, T, C, S: tl.constexpr, BC: tl.constexpr):
    """Width 4. One program walks the rows t_hi - 1 .. t_lo of one segment and channel block backwards in
    time, carrying x[t - 3 .. t] and dz[t + 1 .. t + 3] in registers: each x and dy row is read once."""
    i_c, i_b, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    base = i_b.to(tl.int64) * T * C
    x, dy, dx = x + base, dy + base, dx + base
    cols = i_c * BC + tl.arange(0, BC)
    w0 = tl.load(w + cols * 4, mask=cols < C, other=0.0).to(tl.float32)
    w1 = tl.load(w + cols * 4 + 1, mask=cols < C, other=0.0).to(tl.float32)
    w2 = tl.load(w + cols * 4 + 2, mask=cols < C, other=0.0).to(tl.float32)
    w3 = tl.load(w + cols * 4 + 3, mask=cols < C, other=0.0).to(tl.float32)
    t_lo = i_s * S
    t_hi = tl.minimum(t_lo + S, T)
    # dz of the three rows after the segment (0 past T), and the x window of its last row
    dz1 = _dz_at(x, dy, w0, w1, w2, w3, t_hi, cols, T, C)
    dz2 = _dz_at(x, dy, w0, w1, w2, w3, t_hi + 1, cols, T, C)
    dz3 = _dz_at(x, dy, w0, w1, w2, w3, t_hi + 2, cols, T, C)
    x0, x1 = _row(x, t_hi - 4, cols, T, C), _row(x, t_hi - 3, cols, T, C)
    x2, x3 = _row(x, t_hi - 2, cols, T, C), _row(x, t_hi - 1, cols, T, C)
    # rows loaded two steps ahead of their use (the loop's loads are not pipelined by the compiler)
    xa, xb = _row(x, t_hi - 5, cols, T, C), _row(x, t_hi - 6, cols, T, C)
    dya, dyb = _row(dy, t_hi - 1, cols, T, C), _row(dy, t_hi - 2, cols, T, C)
    dw0 = tl.zeros([BC], dtype=tl.float32)
    dw1, dw2, dw3 = dw0, dw0, dw0
    for step in range(t_hi - t_lo):
        t = t_hi - 1 - step
        z = w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3
        s = tl.sigmoid(z)
        dz = dya * s * (1 + z * (1 - s))
        dxt = w3 * dz + w2 * dz1 + w1 * dz2 + w0 * dz3  # dx[t] = sum_j w_{3-j} dz[t + j]
        tl.store(dx + t * C + cols, dxt.to(dx.dtype.element_ty), mask=cols < C)
        dw0, dw1, dw2, dw3 = dw0 + dz * x0, dw1 + dz * x1, dw2 + dz * x2, dw3 + dz * x3
        dz1, dz2, dz3 = dz, dz1, dz2
        x0, x1, x2, x3 = xa, x0, x1, x2
        xa, xb = xb, _row(x, t - 6, cols, T, C)
        dya, dyb = dyb, _row(dy, t - 2, cols, T, C)
    part = dw_part + ((i_b * tl.num_programs(2) + i_s) * C).to(tl.int64) * 4 + cols * 4
    tl.store(part, dw0, mask=cols < C)
    tl.store(part + 1, dw1, mask=cols < C)
    tl.store(part + 2, dw2, mask=cols < C)
    tl.store(part + 3, dw3, mask=cols < C)


def conv_silu_fwd(x: Tensor, w: Tensor) -> Tensor:
    """x [B, T, C] contiguous, w [C, W] contiguous -> silu(causal depthwise conv) [B, T, C] in x's dtype."""
    (B, T, C), (bt, bc, warps) = x.shape, CONFIG["fwd"]
    y = torch.empty_like(x)
    _conv_silu_fwd_kernel[triton.cdiv(T, bt), triton.cdiv(C, bc), B](x, w, y, T, C, w.shape[1], bt, bc,
                                                                     num_warps=warps)  # fmt: skip
    return y


def conv_silu_bwd(x: Tensor, w: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """(dx [B, T, C] in x's dtype, dw [C, 4] in w's dtype) for the gradient dy of conv_silu_fwd(x, w)."""
    (B, T, C), (seg, bc, warps) = x.shape, CONFIG["bwd"]
    ns = triton.cdiv(T, seg)
    dx = torch.empty_like(x)
    dw_part = torch.empty(B * ns, *w.shape, device=x.device, dtype=torch.float32)
    _conv_silu_bwd_kernel[triton.cdiv(C, bc), B, ns](x, w, dy, dx, dw_part, T, C, seg, bc, num_warps=warps)
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
