"""Triton causal depthwise conv + SiLU on the [B, T, C] layout, forward and backward (see reference.py).

Forward, per (time tile, channel tile, batch) program: W shifted tile loads of x,
z[t] = sum_i w_i x[t - W + 1 + i], y = silu(z). Backward (width W = 4, the model's), recomputing z:
    dz[t]  = dy[t] * silu'(z[t]),          silu'(z) = s (1 + z (1 - s)),  s = sigmoid(z)
    dx[t]  = sum_j w_{3-j} dz[t + j]
    dw_i  += sum_t dz[t] x[t - 3 + i]      (per-program partial sums, reduced in a fixed order: deterministic)
as a walk down each time segment that carries the last four x rows and the next three dz rows in
registers (shifted tiles would read every row 16 times: 2.2 ms at B32 on an H100, 0.11 of copy speed).
The output can be written as up to 3 contiguous channel chunks (the model's q, k, v), so that no split copy
follows the forward and no concatenation of their gradients precedes the backward.
Registered as torch.library custom ops (`hyla::conv_silu_fwd` / `hyla::conv_silu_bwd`) with fake
implementations and an autograd formula, so torch.compile(fullgraph=True) keeps them as single kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import cdiv

Tensor = torch.Tensor
# Per program: fwd (time rows, channels, warps); bwd (time segment walked row by row, channels, warps).
# From bench/conv.py --sweep on an H100 (B32, fwd+bwd): bwd (64, 64, 1) 0.80 ms, (64, 128, 1) 0.94 ms.
CONFIG = {"fwd": (16, 128, 4), "bwd": (64, 64, 1)}
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_WIDTH = 4  # the backward kernel carries exactly four x rows
TRITON_MAX_CHUNKS = 3  # output pointer slots of the kernels (q, k, v)


@triton.jit
def _chunk(p0, p1, p2, j):
    """The base pointer of output chunk j (< 3)."""
    p = p0
    if j == 1:
        p = p1
    if j == 2:
        p = p2
    return p


@triton.jit
def _channels(i_c, CP, BC: tl.constexpr):
    """Program i_c's chunk j, its BC channels within the chunk, their mask and their columns in x (chunk j
    holds x's channels j CP .. j CP + CP - 1; programs do not straddle chunks)."""
    nb = tl.cdiv(CP, BC)
    j = i_c // nb
    local = (i_c % nb) * BC + tl.arange(0, BC)
    return j, local, local < CP, j * CP + local


@triton.jit
def _conv_at(x_ptr, w_ptr, rows, cols, ok, T, SXT, W: tl.constexpr):
    """z[rows, cols] = sum_i w[cols, i] x[rows - W + 1 + i, cols] in fp32 (x rows SXT apart; rows < 0 read as 0)."""
    z = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    for i in tl.static_range(W):
        src = rows - (W - 1) + i
        xi = tl.load(x_ptr + src[:, None] * SXT + cols[None, :], mask=((src >= 0) & (src < T))[:, None] & ok[None, :],
                     other=0.0).to(tl.float32)  # fmt: skip
        wi = tl.load(w_ptr + cols * W + i, mask=ok, other=0.0).to(tl.float32)
        z += xi * wi[None, :]
    return z


@triton.jit
def _conv_silu_fwd_kernel(x, w, y0, y1, y2, T, SXB, SXT, CP, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """y = silu(conv(x)) written as C / CP chunks of CP channels, chunk j to y_j [B, T, CP] (x: sequences SXB
    and rows SXT elements apart)."""
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    j, local, ok, cols = _channels(i_c, CP, BC)
    rows = i_t * BT + tl.arange(0, BT)
    z = _conv_at(x + i_b.to(tl.int64) * SXB, w, rows, cols, ok, T, SXT, W)
    y = _chunk(y0, y1, y2, j) + i_b.to(tl.int64) * T * CP
    tl.store(y + rows[:, None] * CP + local[None, :], (z * tl.sigmoid(z)).to(y.dtype.element_ty),
             mask=(rows < T)[:, None] & ok[None, :])  # fmt: skip


@triton.jit
def _row(x, r, cols, ok, T, stride):
    """Row r of a [T, stride] tile in fp32 at cols (where ok), 0 outside 0 <= r < T."""
    return tl.load(x + r * stride + cols, mask=ok & (r >= 0) & (r < T), other=0.0).to(tl.float32)


@triton.jit
def _dz_at(x, dy, w0, w1, w2, w3, r, cols, local, ok, T, SXT, CP):
    """dz[r] = dy[r] silu'(z[r]) for one row, z[r] recomputed from x[r - 3 .. r] (0 for r >= T)."""
    z = w0 * _row(x, r - 3, cols, ok, T, SXT) + w1 * _row(x, r - 2, cols, ok, T, SXT)
    z += w2 * _row(x, r - 1, cols, ok, T, SXT) + w3 * _row(x, r, cols, ok, T, SXT)
    s = tl.sigmoid(z)
    return _row(dy, r, local, ok, T, CP) * s * (1 + z * (1 - s))


@triton.jit
def _conv_silu_bwd_kernel(x, w, dy0, dy1, dy2, dx, dw_part, T, C, SXB, SXT, CP, S: tl.constexpr, BC: tl.constexpr):
    """Width 4. One program walks the rows t_hi - 1 .. t_lo of one segment and channel block backwards in
    time, carrying x[t - 3 .. t] and dz[t + 1 .. t + 3] in registers: each x and dy row is read once.
    dy comes in chunks as the forward wrote y; x strided as in the forward, dx contiguous."""
    i_c, i_b, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    j, local, ok, cols = _channels(i_c, CP, BC)
    x, dx = x + i_b.to(tl.int64) * SXB, dx + i_b.to(tl.int64) * T * C
    dy = _chunk(dy0, dy1, dy2, j) + i_b.to(tl.int64) * T * CP
    w0 = tl.load(w + cols * 4, mask=ok, other=0.0).to(tl.float32)
    w1 = tl.load(w + cols * 4 + 1, mask=ok, other=0.0).to(tl.float32)
    w2 = tl.load(w + cols * 4 + 2, mask=ok, other=0.0).to(tl.float32)
    w3 = tl.load(w + cols * 4 + 3, mask=ok, other=0.0).to(tl.float32)
    t_lo = i_s * S
    t_hi = tl.minimum(t_lo + S, T)
    # dz of the three rows after the segment (0 past T), and the x window of its last row
    dz1 = _dz_at(x, dy, w0, w1, w2, w3, t_hi, cols, local, ok, T, SXT, CP)
    dz2 = _dz_at(x, dy, w0, w1, w2, w3, t_hi + 1, cols, local, ok, T, SXT, CP)
    dz3 = _dz_at(x, dy, w0, w1, w2, w3, t_hi + 2, cols, local, ok, T, SXT, CP)
    x0, x1 = _row(x, t_hi - 4, cols, ok, T, SXT), _row(x, t_hi - 3, cols, ok, T, SXT)
    x2, x3 = _row(x, t_hi - 2, cols, ok, T, SXT), _row(x, t_hi - 1, cols, ok, T, SXT)
    # rows loaded two steps ahead of their use (the loop's loads are not pipelined by the compiler)
    xa, xb = _row(x, t_hi - 5, cols, ok, T, SXT), _row(x, t_hi - 6, cols, ok, T, SXT)
    dya, dyb = _row(dy, t_hi - 1, local, ok, T, CP), _row(dy, t_hi - 2, local, ok, T, CP)
    dw0 = tl.zeros([BC], dtype=tl.float32)
    dw1, dw2, dw3 = dw0, dw0, dw0
    for step in range(t_hi - t_lo):
        t = t_hi - 1 - step
        z = w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3
        s = tl.sigmoid(z)
        dz = dya * s * (1 + z * (1 - s))
        dxt = w3 * dz + w2 * dz1 + w1 * dz2 + w0 * dz3  # dx[t] = sum_j w_{3-j} dz[t + j]
        tl.store(dx + t * C + cols, dxt.to(dx.dtype.element_ty), mask=ok)
        dw0, dw1, dw2, dw3 = dw0 + dz * x0, dw1 + dz * x1, dw2 + dz * x2, dw3 + dz * x3
        dz1, dz2, dz3 = dz, dz1, dz2
        x0, x1, x2, x3 = xa, x0, x1, x2
        xa, xb = xb, _row(x, t - 6, cols, ok, T, SXT)
        dya, dyb = dyb, _row(dy, t - 2, local, ok, T, CP)
    part = dw_part + ((i_b * tl.num_programs(2) + i_s) * C).to(tl.int64) * 4 + cols * 4
    tl.store(part, dw0, mask=ok)
    tl.store(part + 1, dw1, mask=ok)
    tl.store(part + 2, dw2, mask=ok)
    tl.store(part + 3, dw3, mask=ok)


def conv_silu_fwd(x: Tensor, w: Tensor, chunks: int = 1) -> list[Tensor]:
    """x [B, T, C] with unit channel stride, w [C, W] contiguous -> silu(causal depthwise conv) in x's dtype, as
    `chunks` (<= 3) contiguous [B, T, C / chunks] tensors (what y.chunk(chunks, -1) would give, without the
    copies)."""
    (B, T, C), (bt, bc, warps) = x.shape, CONFIG["fwd"]
    CP = C // chunks
    ys = [x.new_empty(B, T, CP) for _ in range(chunks)]
    y0, y1, y2 = (ys * 3)[:3]  # unused pointer slots repeat y0
    _conv_silu_fwd_kernel[cdiv(T, bt), chunks * cdiv(CP, bc), B](
        x, w, y0, y1, y2, T, x.stride(0), x.stride(1), CP, w.shape[1], bt, bc, num_warps=warps
    )
    return ys


def conv_silu_bwd(x: Tensor, w: Tensor, dys: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(dx [B, T, C] in x's dtype, dw [C, 4] in w's dtype) for the gradients dys (contiguous, one per chunk)
    of conv_silu_fwd(x, w, len(dys))."""
    (B, T, C), (seg, bc, warps) = x.shape, CONFIG["bwd"]
    CP, ns = C // len(dys), cdiv(T, seg)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dw_part = torch.empty(B * ns, *w.shape, device=x.device, dtype=torch.float32)
    dy0, dy1, dy2 = (dys * 3)[:3]
    _conv_silu_bwd_kernel[len(dys) * cdiv(CP, bc), B, ns](
        x, w, dy0, dy1, dy2, dx, dw_part, T, C, x.stride(0), x.stride(1), CP, seg, bc, num_warps=warps
    )
    return dx, dw_part.sum(0).to(w.dtype)


# needs_fixed_stride_order: under torch.compile x may keep a padded row stride (inductor pads the rows of the
# 3024-wide projection that produces it to 3072 elements); the default, exact eager strides, copied it twice
# a layer (forward, and again in the backward) in session 6's trace of the compiled 95m step.
@torch.library.custom_op("hyla::conv_silu_fwd", mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,))
def _fwd_op(x: Tensor, w: Tensor, chunks: int) -> list[Tensor]:
    return conv_silu_fwd(x, w, chunks)


@_fwd_op.register_fake
def _(x, w, chunks):
    B, T, C = x.shape
    return [x.new_empty(B, T, C // chunks) for _ in range(chunks)]


@torch.library.custom_op("hyla::conv_silu_bwd", mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,))
def _bwd_op(x: Tensor, w: Tensor, dys: list[Tensor]) -> tuple[Tensor, Tensor]:
    return conv_silu_bwd(x, w, dys)


@_bwd_op.register_fake
def _(x, w, dys):
    return x.new_empty(x.shape), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    x, w, _ = inputs
    ctx.save_for_backward(x, w)


def _backward(ctx, dys):
    x, w = ctx.saved_tensors
    B, T, C = x.shape
    dys = [x.new_zeros(B, T, C // len(dys)) if d is None else d.contiguous() for d in dys]  # unused chunks
    return *torch.ops.hyla.conv_silu_bwd(x, w, dys), None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def triton_causal_conv1d_silu(x: Tensor, weight: Tensor, chunks: int = 1) -> list[Tensor]:
    """silu(causal depthwise conv) with zero left context by the Triton kernels, as `chunks` contiguous channel
    chunks; inputs validated by `kernels.conv.causal_conv1d_silu`. x is copied unless its channels are
    contiguous (rows and sequences may be strided, e.g. a slice of a wider buffer)."""
    x = x if x.stride(2) == 1 else x.contiguous()
    return torch.ops.hyla.conv_silu_fwd(x, weight.contiguous(), chunks)
