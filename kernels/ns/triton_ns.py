"""Triton Newton-Schulz: the quintic iteration of `reference.py` for many matrices in a few launches a step.

Every matrix is handled in its wide orientation X [m, n] (m <= n) in a packed workspace; a tall input G
is read as G^T by indexing, never copied. Each launch runs over a tile table that spans every matrix of
a set (any mix of shapes), so a whole optimizer's set of matrices costs the same launches as one matrix.
The launches are products of five kinds (the kernel's STAGE):

    PREP:     X_0 = G                         G (any float dtype, either orientation) -> workspace
    XXT:      R = X X^T                       tiles of R [m, m], K = n
    POLY:     B = a I + b R + c R R^T         tiles of B [m, m], K = m    (R is symmetric: R^2 = R R^T)
    APPLY:    X' = U X                        tiles of X' [m, n], K = m; the last one writes X' in G's
                                              layout and dtype straight to the output
    PRODUCT:  U V                             tiles of [m, m], K = m, for symmetric U, V that commute

The plain iteration is XXT, POLY, APPLY (U = B) each step: X' = a X + (b R + c R^2) X = B X (with a I folded
into B's diagonal, APPLY has no second read of X in its epilogue; in bf16 both forms give the same error
against the float64 iteration, profiles/ns.md).

Gram form (Zhang, Amsel, Chen and Dao 2026, "Gram Newton-Schulz"). Every B_t is a polynomial in R_t, and
X_{t+1} = B_t X_t, so within a run of steps X_t = Q_t X_s with Q_t = B_s ... B_{t-1} (all symmetric, all
commuting) and R_{t+1} = B_t R_t B_t. A segment of steps s..e forms R_s = X_s X_s^T once, then per step POLY,
the PRODUCTs Q_t B_t and R_t B_t in one launch, and R_{t+1} = B_t (R_t B_t); one APPLY X_{e+1} = Q_{e+1} X_s
ends it. For a wide matrix that trades rectangular products (K = n, or N = n) for [m, m] ones: with segments
of 2 + 2 + 1 steps (`_segments`), 3 rectangular pairs and 11 products of m^3 instead of 5 and 5, 15% fewer
FLOPs (dense count) at 576 x 1536 and 26% at 576 x 3024. Segments are short because in low precision R_t
drifts from X_t X_t^T: rounding leaves it small negative eigenvalues, which every update R_{t+1} = B_t R_t B_t
multiplies by ~a_t^2. Segments of 3 + 2 steps (two updates, 3.4445^4 = 141) passed a CPU emulation of bf16
but blew up on the H100 for a 1/i spectrum (relative error 30, singular values up to 279; profiles/ns.md);
with 2 + 2 + 1 the error stays at the plain iteration's or below. fp16's 3 more mantissa bits allow 3 + 2
(`_segments` scales the bound by the work dtype's epsilon). Matrices of fewer than
`Config.gram_min_rows` rows stay plain: little to gain, and twice the plain error emulated at 192 x 576.

Operands are in the work dtype (bf16; or fp16, an option; fp32 for tests, with exact fp32 products, and for
matrices with a side <= TINY, with 3-pass tf32 products, see `newton_schulz_triton`), accumulation in fp32;
X_0 = G, stored before the normalization, is kept in bf16 under fp16 (G's range). The [m, m]
results are symmetric, so with `sym=True` the tables hold only the tiles on and above the diagonal and
each off-diagonal tile is also stored mirrored (half their FLOPs). When m leaves a last row block of at
most half a tile (576 = 4 * 128 + 64), APPLY gives it half-height tiles instead of padded full ones
(`Config.half_tiles`: 10% fewer rows of products at m = 576). The symmetric products keep full tiles:
there a half block saves no tile, only area, and measured no faster (profiles/ns.md).

Frobenius normalization is fused: the prep writes each tile's sum of squares of G; the first XXT forms
s = ||G||_F + eps from them and computes R_0 = (G G^T) / s^2 (scaling its fp32 accumulator), and the first
APPLY applies 1 / s in its epilogue: X_1 = B_0 G / s (plain), or Q G / s (Gram form).

Muon's update fuses into the same two ends (`muon_update_triton`): the prep reads the gradient and the
momentum buffer, writes the new buffer M = mu M + G and puts U = G + mu M (Nesterov) or M into the
workspace; the last APPLY applies W = decay W - alpha NS(U) to the parameter in place.

All launches of a call, over all its sets of matrices (each on its own stream), are captured into one
CUDA graph and replayed; per-call addresses reach the kernels through a small table (see `_Call`).

On sm_90, POLY and PRODUCT of a set whose matrices share m (the Gram-form set of the 95m model) run in the
warp-specialized Gluon kernel of `gluon_products.py` instead (same tiles and arithmetic, same bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import triton
import triton.language as tl

try:  # Gluon (triton.experimental) is optional: the Triton stages serve every set without it
    from kernels.ns import gluon_products
except ImportError:
    gluon_products = None

# meta columns (int64, one row per matrix, static per shape set). Every row stride below is a multiple of
# ALIGN elements and the columns past a matrix's width are zeros, so the contiguous dimension of every tile
# is masked against a multiple of ALIGN (16-byte vector loads) and the zero padding adds nothing to any
# product.
M_M, M_N, M_LDX, M_LDA, M_XOFF, M_AOFF, M_TALL, M_LDG, M_NPART = (tl.constexpr(c) for c in range(9))
META_COLS = tl.constexpr(9)
# per-call table io (int64): offsets in elements of matrix k's source (from `g`), momentum buffer (from
# `mbuf`, Muon only) and destination (from `out`: the output, or the parameter for Muon)
IO_SRC, IO_BUF, IO_DST = (tl.constexpr(c) for c in range(3))
IO_COLS = tl.constexpr(3)
# per-call table hyper (fp32, Muon only): momentum, Nesterov flag, weight-decay factor, update scale
H_MU, H_NEST, H_DECAY, H_ALPHA = (tl.constexpr(c) for c in range(4))
H_COLS = tl.constexpr(4)
ALIGN_N = 16
ALIGN = tl.constexpr(ALIGN_N)


@dataclass(frozen=True)
class Config:
    """Tile shapes: `bs` x `bs` tiles (K step `bk`) for the symmetric products (XXT, POLY, PRODUCT),
    `bm` x `bn` (K step `bk3`) for APPLY (and the prep's tiles); warps and pipeline depth for each; the
    products' precision when the work dtype is fp32 (tl.dot input_precision: "ieee" = FMA, or "tf32x3" on
    tensor cores); `half_tiles`: in APPLY, a last row block of at most half a tile gets half-height tiles.
    The Gram form (module doc) is used for matrices with n >= `gram_aspect` m and m >= `gram_min_rows`, in
    segments whose growth of R's rounding error, times the work dtype's machine epsilon, stays <= `gram_drift`
    (`_segments`); gram_aspect=float("inf") turns it off. `gluon`: on sm_90, a set whose matrices share m runs
    POLY and PRODUCT with the warp-specialized Gluon kernel of `gluon_products` (needs bs = 128)."""

    bs: int = 128
    bk: int = 64
    warps: int = 8
    stages: int = 3
    bm: int = 128
    bn: int = 128
    bk3: int = 64
    warps3: int = 8
    stages3: int = 3
    fp32_dot: str = "ieee"
    half_tiles: bool = True
    gram_aspect: float = 2.5
    gram_min_rows: int = 256
    gram_drift: float = 0.15
    gluon: bool = True


# stages (the kernel's STAGE): the prep and the four products, see the module doc
PREP, XXT, POLY, APPLY, PRODUCT = (tl.constexpr(c) for c in range(5))
# tile kinds (column 3 of the tile tables): APPLY's full tiles or half rows (its last row block); PRODUCT's
# tiles of the launch's first or second product
FULL, HALF_ROWS = (tl.constexpr(c) for c in range(2))
SECOND = HALF_ROWS


@triton.jit
def _g_load(ptr, r, c, m, n, ldg, tall):
    """Tile X[r, c] of the wide view X [m, n] of a row-major G with row stride `ldg` (X = G^T when
    `tall`; then m == ldg). Pointers are formed inside each branch so both get 16-byte accesses."""
    if tall:
        v = tl.load(ptr + c[None, :] * ldg + r[:, None], mask=(r[:, None] < ldg) & (c[None, :] < n), other=0.0)
    else:
        v = tl.load(ptr + r[:, None] * ldg + c[None, :], mask=(r[:, None] < m) & (c[None, :] < ldg), other=0.0)
    return v


@triton.jit
def _g_store(ptr, v, r, c, m, n, ldg, tall):
    if tall:
        tl.store(ptr + c[None, :] * ldg + r[:, None], v, mask=(r[:, None] < ldg) & (c[None, :] < n))
    else:
        tl.store(ptr + r[:, None] * ldg + c[None, :], v, mask=(r[:, None] < m) & (c[None, :] < ldg))


@triton.jit
def _w_ptrs(ptr, r, c, rows, ld):
    """Pointers and mask of tile [r, c] of a row-major workspace matrix (`rows` rows, row stride `ld`)."""
    return ptr + r[:, None] * ld + c[None, :], (r[:, None] < rows) & (c[None, :] < ld)


@triton.jit
def _w_tile(ptr, r, c, rows, ld):
    p, mask = _w_ptrs(ptr, r, c, rows, ld)
    return tl.load(p, mask=mask, other=0.0)


@triton.jit
def _io(io, k, col):
    return tl.multiple_of(tl.load(io + k * IO_COLS + col), ALIGN)


@triton.jit
def _sym_tile(left, right, ld, dst, lda, m, r0, c0, scale, coef_a, coef_b, coef_c,
              STAGE: tl.constexpr, SYM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              DOT_PREC: tl.constexpr):  # fmt: skip
    """Tile [r0:r0+BM, c0:c0+BN] of a symmetric [m, m] result, as left[rows] @ right[cols]^T over K = ld, and
    with SYM its mirror: R = scale * X X^T (XXT: left = right = X, K = n), B = a I + b R + c R R^T
    (POLY: left = right = R, K = m) or U V (PRODUCT: two commuting symmetric U, V, so U V = U V^T is symmetric)."""
    rows = r0 + tl.arange(0, BM)
    cols = c0 + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, ld, BK):
        lt = _w_tile(left, rows, k0 + kk, m, ld)
        rt = _w_tile(right, cols, k0 + kk, m, ld)
        acc = tl.dot(lt, tl.trans(rt), acc, input_precision=DOT_PREC)
    if STAGE == XXT:
        acc = acc * scale
    elif STAGE == POLY:
        acc = coef_c * acc + coef_b * _w_tile(left, rows, cols, m, lda).to(tl.float32)
        # a I on the diagonal, in tile-local indices: rows == cols took 142 registers under Triton 3.6, one
        # program per SM instead of two (a first version at 182 registers ran B 25% slower on the H100)
        eye = (tl.arange(0, BM)[:, None] == tl.arange(0, BN)[None, :]) & (r0 == c0)
        acc = tl.where(eye, acc + coef_a, acc)
    y = acc.to(dst.dtype.element_ty)
    p, mask = _w_ptrs(dst, rows, cols, m, lda)
    tl.store(p, y, mask=mask)
    if SYM:  # the mirror tile; the padding columns of its row block are covered as well
        mask = (cols[None, :] < m) & (rows[:, None] < lda) & (r0 != c0)
        tl.store(dst + cols[None, :] * lda + rows[:, None], y, mask=mask)


@triton.jit
def _x_tile(b, ldb, x, ldx, x_out, hyper, k, m, n, r0, c0, scale, out, ldg,
            TALL: tl.constexpr, LAST: tl.constexpr, MUON: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            BK: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Tile [r0:r0+BM, c0:c0+BN] of X' = scale * U X (U = `b`: B, or the Gram form's Q); the last APPLY
    writes it in G's layout to `out` (for Muon: W = decay W - alpha X' in place), the others to `x_out`."""
    rows = r0 + tl.arange(0, BM)
    cols = c0 + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, ldb, BK):
        u = _w_tile(b, rows, k0 + kk, m, ldb).to(x.dtype.element_ty)  # (X_0 in bf16 under fp16 work: see _Runner)
        acc = tl.dot(u, _w_tile(x, k0 + kk, cols, m, ldx), acc, input_precision=DOT_PREC)
    y = (acc * scale).to(x_out.dtype.element_ty)
    if LAST:  # the result, rounded to the work dtype like every X, in G's layout
        if MUON:
            decay = tl.load(hyper + k * H_COLS + H_DECAY)
            alpha = tl.load(hyper + k * H_COLS + H_ALPHA)
            w = decay * _g_load(out, rows, cols, m, n, ldg, TALL).to(tl.float32) - alpha * y.to(tl.float32)
            _g_store(out, w.to(out.dtype.element_ty), rows, cols, m, n, ldg, TALL)
        else:
            _g_store(out, y.to(out.dtype.element_ty), rows, cols, m, n, ldg, TALL)
    else:
        p, mask = _w_ptrs(x_out, rows, cols, m, ldx)
        tl.store(p, y, mask=mask)


@triton.jit
def _x_tile_or_half(half, b, ldb, x, ldx, x_out, hyper, k, m, n, r0, c0, scale, out, ldg,
                    TALL: tl.constexpr, LAST: tl.constexpr, MUON: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    if half:
        _x_tile(b, ldb, x, ldx, x_out, hyper, k, m, n, r0, c0, scale, out, ldg, TALL, LAST, MUON, BM // 2, BN, BK,
                DOT_PREC)  # fmt: skip
    else:
        _x_tile(b, ldb, x, ldx, x_out, hyper, k, m, n, r0, c0, scale, out, ldg, TALL, LAST, MUON, BM, BN, BK,
                DOT_PREC)  # fmt: skip


@triton.jit
def _ns_stage_kernel(
    tiles,  # int32 [T, 4]: (matrix, tile row, tile column, tile kind)
    meta,  # int64 [K, META_COLS]
    io,  # int64 [K, IO_COLS]: per-call offsets (PREP and the last APPLY)
    hyper,  # fp32 [K, H_COLS]: Muon's per-matrix scalars (MUON only)
    g,  # anchor of the inputs (PREP): G, or Muon's gradients
    mbuf,  # anchor of Muon's momentum buffers (PREP, MUON only)
    out,  # anchor of the outputs (the last APPLY): in G's (padded) layout, or Muon's parameters
    x_in,  # workspace X read (XXT, APPLY): wide, row-major, packed
    x_out,  # workspace X written (PREP, APPLY)
    sq,  # the square [m, m] workspaces (R, B, ...), packed like X, one after another
    u_off,  # element offsets in `sq` of the workspaces of the left operand (POLY, APPLY, PRODUCT),
    v_off,  # the right operand (PRODUCT) and the destination (XXT, POLY, PRODUCT);
    d_off,
    u2_off,  # and of the left operand and destination of PRODUCT's second product (tiles of kind SECOND)
    d2_off,
    sumsq,  # fp32 [K, NPART]: sums of squares of G over the prep's tiles (||G||_F^2 is their sum)
    coef_a,
    coef_b,
    coef_c,
    eps,
    STAGE: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    MUON: tl.constexpr,
    SYM: tl.constexpr,
    NPART: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    t = tl.program_id(0)
    k = tl.load(tiles + 4 * t)
    i = tl.load(tiles + 4 * t + 1)
    j = tl.load(tiles + 4 * t + 2)
    r0 = i * BM  # (a half tile starts where its full tile would)
    c0 = j * BN
    row = meta + k * META_COLS
    m = tl.load(row + M_M).to(tl.int32)
    n = tl.load(row + M_N).to(tl.int32)
    ldx = tl.multiple_of(tl.load(row + M_LDX).to(tl.int32), ALIGN)
    lda = tl.multiple_of(tl.load(row + M_LDA).to(tl.int32), ALIGN)
    x_off = tl.multiple_of(tl.load(row + M_XOFF), ALIGN)
    a_off = tl.multiple_of(tl.load(row + M_AOFF), ALIGN)
    scale = 1.0
    if FIRST and (STAGE == XXT or STAGE == APPLY):  # s = ||G||_F + eps from the prep's partial sums
        d = tl.arange(0, NPART)
        s = tl.sqrt(tl.sum(tl.load(sumsq + k * NPART + d, mask=d < tl.load(row + M_NPART), other=0.0))) + eps
        scale = 1.0 / (s * s) if STAGE == XXT else 1.0 / s  # R_0 = G G^T / s^2;  X_1 = B_0 G / s
    if STAGE == PREP or (STAGE == APPLY and LAST):  # G's layout: [mo, ldg] row-major, read as X = G^T when tall
        ldg = tl.multiple_of(tl.load(row + M_LDG).to(tl.int32), ALIGN)
        tall = tl.load(row + M_TALL) != 0

    if STAGE == PREP:  # (APPLY's tiles, all full height): X_0 = G, or for Muon M = mu M + G, X_0 = G + mu M or M
        rows = r0 + tl.arange(0, BM)
        cols = c0 + tl.arange(0, BN)
        v = _g_load(g + _io(io, k, IO_SRC), rows, cols, m, n, ldg, tall)
        if MUON:
            mu = tl.load(hyper + k * H_COLS + H_MU)
            mp = mbuf + _io(io, k, IO_BUF)
            v = v.to(tl.float32)
            mom = mu * _g_load(mp, rows, cols, m, n, ldg, tall).to(tl.float32) + v
            _g_store(mp, mom.to(mbuf.dtype.element_ty), rows, cols, m, n, ldg, tall)
            v = tl.where(tl.load(hyper + k * H_COLS + H_NEST) != 0, v + mu * mom, mom)
        v2 = v.to(tl.float32) * v.to(tl.float32)
        tl.store(sumsq + k * NPART + i * tl.cdiv(n, BN) + j, tl.sum(tl.sum(v2, axis=1), axis=0))
        p, mask = _w_ptrs(x_out + x_off, rows, cols, m, ldx)
        tl.store(p, v.to(x_out.dtype.element_ty), mask=mask)
    elif STAGE == APPLY:
        half = tl.load(tiles + 4 * t + 3) != FULL
        args = (half, sq + u_off + a_off, lda, x_in + x_off, ldx, x_out + x_off, hyper, k, m, n, r0, c0, scale)
        if LAST:  # a branch per orientation of G around the whole tile: straight-line epilogues (a branch
            # inside the epilogue made ptxas serialize the K loop's wgmma and spill; sm_90 compile, ptxas -v)
            dst = out + _io(io, k, IO_DST)
            if tall:
                _x_tile_or_half(*args, dst, ldg, True, LAST, MUON, BM, BN, BK, DOT_PREC)
            else:
                _x_tile_or_half(*args, dst, ldg, False, LAST, MUON, BM, BN, BK, DOT_PREC)
        else:
            _x_tile_or_half(*args, out, 0, False, LAST, MUON, BM, BN, BK, DOT_PREC)
    else:
        if STAGE == XXT:
            left, right, ld, dst = x_in + x_off, x_in + x_off, ldx, sq + d_off + a_off
        elif STAGE == POLY:
            left, right, ld, dst = sq + u_off + a_off, sq + u_off + a_off, lda, sq + d_off + a_off
        else:
            second = (tl.load(tiles + 4 * t + 3) == SECOND).to(tl.int64)
            left = sq + (u_off + second * (u2_off - u_off)) + a_off
            right, ld, dst = sq + v_off + a_off, lda, sq + (d_off + second * (d2_off - d_off)) + a_off
        _sym_tile(left, right, ld, dst, lda, m, r0, c0, scale, coef_a, coef_b, coef_c, STAGE, SYM, BM, BN, BK,
                  DOT_PREC)  # fmt: skip


@dataclass(frozen=True)
class _Plan:
    meta: torch.Tensor  # int64 [K, META_COLS]
    tiles_sym: torch.Tensor  # int32 [T12, 4], tiles of the [m, m] stages
    tiles_sym2: torch.Tensor  # int32 [2 T12, 4], the same twice, the second time of kind SECOND
    tiles_x: torch.Tensor  # int32 [T3, 4], tiles of the [m, n] stages (PREP ignores their kind)
    x_size: int
    a_size: int
    npart: int
    ms: frozenset  # the matrices' m


def _round(x: int, to: int = ALIGN_N) -> int:
    return -(-x // to) * to


@lru_cache(maxsize=64)
def _plan(shapes: tuple[tuple[int, int], ...], cfg: Config, sym: bool, device: torch.device) -> _Plan:
    """Meta rows and tile tables for a list of matrix shapes [mo, no] (one entry per matrix).

    G and the output are seen as [mo, ldg] row-major (ldg = no rounded up to ALIGN, zero columns past
    no); the wide view is X = G ([mo, ldg]) or X = G^T ([ldg, mo], zero rows past no) when mo > no.
    APPLY's half tiles need half a tile to be a valid tensor-core product (>= 16 rows).
    """
    rows, x_off, a_off = [], 0, 0
    for mo, no in shapes:
        ldg, tall = _round(no), mo > no
        m, n = (ldg, mo) if tall else (mo, ldg)
        ldx, lda = _round(n), _round(m)
        npart = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)  # the prep's tiles
        rows.append([m, n, ldx, lda, x_off, a_off, int(tall), ldg, npart])
        x_off, a_off = x_off + m * ldx, a_off + m * lda
    npart = max(16, triton.next_power_of_2(max(r[M_NPART] for r in rows)))  # one compiled variant for most
    half_x = cfg.half_tiles and cfg.bm >= 32
    # longest K first (XXT: K = n; the others: K = m), the tiles of one matrix together for L2 reuse
    by_n = sorted(range(len(rows)), key=lambda k: -rows[k][M_N])
    by_m = sorted(range(len(rows)), key=lambda k: -rows[k][M_M])
    t_sym, t_x = [], []
    for k in by_n:
        nb = triton.cdiv(rows[k][M_M], cfg.bs)
        t_sym += [(k, i, j, int(FULL)) for i in range(nb) for j in range(i if sym else 0, nb)]
    for k in by_m:
        m, n = rows[k][M_M], rows[k][M_N]
        mb, nb = triton.cdiv(m, cfg.bm), triton.cdiv(n, cfg.bn)
        for i in range(mb):
            kind = HALF_ROWS if half_x and m - i * cfg.bm <= cfg.bm // 2 else FULL  # (only the last can be)
            t_x += [(k, i, j, int(kind)) for j in range(nb)]

    def dev(v, dt):
        return torch.tensor(v, dtype=dt).to(device)

    t_sym2 = t_sym + [(k, i, j, int(SECOND)) for k, i, j, _ in t_sym]
    return _Plan(
        dev(rows, torch.int64), dev(t_sym, torch.int32), dev(t_sym2, torch.int32), dev(t_x, torch.int32), x_off,
        a_off, npart, frozenset(r[M_M] for r in rows),
    )  # fmt: skip


TINY = 8  # matrices with a side <= TINY run with fp32 operands (see newton_schulz_triton)
# their tiles: with 128-wide tiles the one [16, 16] tile of A = X X^T (K = 3024 for the conv weight)
# made 8 programs of mostly-masked fp32 products take 0.6 ms a step; with 16-wide tiles and FMA ("ieee")
# products XXT still took ~70 us a step whatever the K step (64: 75, 256: 69, 512: 112 us); 3-pass tf32
# products on tensor cores ("tf32x3", ~fp32 accuracy: 3e-6 relative error) take 42 us a step at K step 64
# (but 680 us at 256); and the set runs on a side stream alongside the main set (see _each_set), where
# its 0.24 ms of launches hide completely (H100 measurements, profiles/ns.md)
TINY_CONFIG = Config(bs=16, bk=64, warps=4, stages=2, bm=16, bn=128, bk3=16, warps3=4, stages3=2, fp32_dot="tf32x3")


def _anchor(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor whose address is a multiple of ALIGN elements: per-call addresses are passed to the
    kernels as element offsets from it, so captured graphs stay valid for any later inputs."""
    raw = torch.empty(2 * ALIGN_N, dtype=dtype, device=device)
    esize = raw.element_size()
    shift = (-raw.data_ptr() // esize) % ALIGN_N
    return raw[shift : shift + ALIGN_N]


# the square workspaces of `_recipe`
R, RB, B0, B1, Q0, Q1 = range(6)


@dataclass(frozen=True)
class _Launch:
    """One launch of a call: `stage` on every matrix; X workspaces x_in -> x_out; square workspaces
    u (left operand), v (right operand), d (destination), and PRODUCT's optional second product u2 v -> d2."""

    stage: int
    coeffs: tuple[float, float, float] = (0.0, 0.0, 0.0)
    x_in: int = 0
    x_out: int = 0
    u: int = 0
    v: int = 0
    d: int = 0
    u2: int | None = None
    d2: int | None = None
    first: bool = False
    last: bool = False


def gram_form(shape: tuple[int, int], cfg: Config) -> bool:
    """Whether a matrix of this shape (either orientation) runs in the Gram form (with symmetric tiles)."""
    m, n = min(shape), max(shape)
    return n >= cfg.gram_aspect * m and m >= cfg.gram_min_rows


def _segments(schedule: tuple, work_dtype: torch.dtype, drift: float) -> tuple[int, ...]:
    """Lengths of the Gram form's segments (module doc). A spurious eigenvalue -d < 0 of R (its rounding, of
    size eps = machine epsilon of the work dtype relative to ||R|| ~ 1) grows by r p_t(r)^2 ~ a_t^2 per update
    R_{t+1} = B_t R_t B_t (all steps of a segment but its last), and faster once it is no longer small, as
    b_t < 0. So a segment takes steps while eps times the product of a_t^2 over its updates stays <= `drift`.
    Measured on the H100 (profiles/ns.md): in bf16 (eps 2^-7) one update of the default coefficients
    (3.4445^2 = 11.9: 0.09) kept the error at the plain iteration's, two (141: 1.1) blew up for a 1/i spectrum;
    in fp16 (eps 2^-10) two updates (0.14) halved bf16's error (run 18). Config.gram_drift = 0.15 gives
    2 + 2 + 1 steps in bf16 and 3 + 2 in fp16. A per-step schedule runs plain (segments of 1): Polar Express's
    steep steps (a_t^2 = 70, 17, 15, 11, 5) leave it the last two, and with those the error of a Gaussian
    576 x 1536 went from 1.0e-2 to 2.5e-2 in bf16 on the H100."""
    if len(set(schedule)) > 1:
        return (1,) * len(schedule)
    limit = drift / torch.finfo(work_dtype).eps
    out, t = [], 0
    while t < len(schedule):
        n, g = 1, 1.0
        while t + n < len(schedule) and g * schedule[t + n - 1][0] ** 2 <= limit:
            g, n = g * schedule[t + n - 1][0] ** 2, n + 1
        out.append(n)
        t += n
    return tuple(out)


def _recipe(schedule: tuple, segments: tuple[int, ...], x_buffers: int = 2) -> list[_Launch]:
    """The launches of one call, the steps taken in segments of the given lengths (module doc, Gram form):
    each segment forms R = X X^T from the rectangular X once, runs its steps on [m, m] matrices only and
    applies their product Q to X at its end; segments of 1 step are the plain iteration (XXT, POLY, APPLY).
    The prep writes X_0 to X workspace 0; with 3 workspaces X_0 keeps its own (see `_Runner`)."""
    launches, x, s0 = [_Launch(int(PREP), x_out=0)], 0, 0
    for length in segments:
        seg, s0 = range(s0, s0 + length), s0 + length
        launches.append(_Launch(int(XXT), x_in=x, d=R, first=seg[0] == 0))
        q = None  # Q_t = B_{s0} ... B_{t-1}: None while it is I
        for t in seg:
            b = (B0, B1)[(t - seg[0]) % 2]  # (Q may still be B_{t-1})
            launches.append(_Launch(int(POLY), schedule[t], u=R, d=b))  # B_t = a I + b R_t + c R_t^2
            more = t < seg[-1]
            qn = Q1 if q == Q0 else Q0
            products = ([(q, qn)] if q is not None else []) + ([(R, RB)] if more else [])  # Q_t B_t, R_t B_t
            if products:
                (u, d), (u2, d2) = products[0], products[-1] if len(products) == 2 else (None, None)
                launches.append(_Launch(int(PRODUCT), u=u, v=b, d=d, u2=u2, d2=d2))
            if more:  # R_{t+1} = B_t R_t B_t
                launches.append(_Launch(int(PRODUCT), u=b, v=RB, d=R))
            q = b if q is None else qn
        x_next = 1 if x != 1 else (2 if x_buffers == 3 else 0)
        launches.append(_Launch(int(APPLY), x_in=x, x_out=x_next, u=q, first=seg[0] == 0,
                                last=seg[-1] == len(schedule) - 1))  # fmt: skip
        x = x_next
    return launches


class _Runner:
    """Static workspaces of one set of matrices (`_sets`: shapes, work dtype, config, segments). Its launches
    read the per-call tables `io` and `hyper` (its rows of the call's) and address the per-call tensors as
    offsets from the call's `anchors` (see `_Call`)."""

    def __init__(self, plan, schedule, segments, eps, work_dtype, cfg, sym, muon, anchors, io, hyper, device):
        self.plan, self.eps, self.cfg, self.sym, self.muon = plan, eps, cfg, sym, muon
        self.anchors, self.io, self.hyper = anchors, io, hyper
        # X_0 = G is stored before the normalization (fused downstream, module doc), so in a dtype with G's
        # range: bf16 when the work dtype is fp16 (APPLY converts U to it), in a workspace of its own
        x0_dtype = torch.bfloat16 if work_dtype == torch.float16 else work_dtype
        x_dtypes = (x0_dtype, work_dtype) + ((work_dtype,) if x0_dtype != work_dtype else ())
        self.recipe = _recipe(schedule, segments, len(x_dtypes))
        self.xs = [torch.zeros(plan.x_size, dtype=dt, device=device) for dt in x_dtypes]
        nsq = 1 + max(max(L.u, L.v, L.d, L.u2 or 0, L.d2 or 0) for L in self.recipe)
        self.sq = torch.zeros(nsq * plan.a_size, dtype=work_dtype, device=device)
        self.sumsq = torch.zeros(plan.meta.shape[0] * plan.npart, dtype=torch.float32, device=device)
        self.prec = cfg.fp32_dot if work_dtype == torch.float32 else "tf32"  # (16-bit: ignored)
        self.gluon = None  # the [m, m] stages' Gluon kernel (Config.gluon)
        g = gluon_products
        if g is not None and cfg.gluon and sym and cfg.bs == g.BM and g.usable(device, plan.ms, work_dtype):
            (m,) = plan.ms
            self.gluon = gluon_products.SymProducts(self.sq, plan.meta.shape[0], m, _round(m))

    def launch(self, L: _Launch) -> None:
        cfg, plan = self.cfg, self.plan
        if L.stage in (PREP, APPLY):
            tiles, bm, bn, bk, warps, nst = plan.tiles_x, cfg.bm, cfg.bn, cfg.bk3, cfg.warps3, cfg.stages3
        else:
            tiles = plan.tiles_sym2 if L.u2 is not None else plan.tiles_sym
            if self.gluon is not None and L.stage != XXT:  # POLY, PRODUCT
                self.gluon.launch(tiles, L.stage == POLY, L.coeffs, L.u, L.v, L.d, L.u2 or 0, L.d2 or 0)
                return
            bm, bn, bk, warps, nst = cfg.bs, cfg.bs, cfg.bk, cfg.warps, cfg.stages
        size = plan.a_size
        offs = [L.u * size, L.v * size, L.d * size, (L.u2 or 0) * size, (L.d2 or 0) * size]
        _ns_stage_kernel[(tiles.shape[0],)](
            tiles, plan.meta, self.io, self.hyper, *self.anchors, self.xs[L.x_in], self.xs[L.x_out], self.sq,
            *offs, self.sumsq, *L.coeffs, self.eps, STAGE=L.stage, FIRST=L.first, LAST=L.last, MUON=self.muon,
            SYM=self.sym, NPART=plan.npart, BM=bm, BN=bn, BK=bk, DOT_PREC=self.prec, num_warps=warps,
            num_stages=nst,
        )  # fmt: skip

    def launches(self):
        for L in self.recipe:
            self.launch(L)


def _sets(shapes, schedule, work_dtype, cfg, sym) -> list[tuple[np.ndarray, torch.dtype, Config, tuple]]:
    """The non-empty sets of matrices, as (indices, work dtype, config, segments): the wide ones (n >=
    cfg.gram_aspect m, m >= cfg.gram_min_rows, and `sym`) in the Gram form (`_segments`), the others in the
    plain iteration, and those with a side <= TINY plain, with fp32 operands and TINY_CONFIG."""

    def kind(s):
        if work_dtype != torch.float32 and min(s) <= TINY:
            return 2
        # (the Gram form needs the [m, m] results exactly symmetric, as the mirrored tiles of `sym` store
        # them: with both triangles computed, its error at 576 x 1536 was 2.3e-2 on the H100)
        return 0 if sym and gram_form(s, cfg) else 1

    kinds, plain = np.array([kind(s) for s in shapes]), (1,) * len(schedule)
    return [
        (idx, dt, c, seg)
        for which, dt, c, seg in ((0, work_dtype, cfg, _segments(schedule, work_dtype, cfg.gram_drift)),
                                  (1, work_dtype, cfg, plain), (2, torch.float32, TINY_CONFIG, plain))
        if len(idx := np.flatnonzero(kinds == which))
    ]  # fmt: skip


_SIDE_STREAMS: dict = {}


class _Call:
    """Everything of one call for a list of matrix shapes: the matrices split into `_sets`, a `_Runner` each.

    Per-call addresses (inputs, outputs or parameters, momentum buffers) reach the kernels as element
    offsets from fixed anchor tensors (one per dtype of g, mbuf, out) in one small device table for all
    sets (`io`, and Muon's scalars `hyper`), refreshed by one copy per call. So on CUDA the launches of every
    set, both ends included, are captured once into one CUDA graph and replayed (the workspaces are static;
    calls on one stream are ordered, so reuse is safe). On CUDA the first set runs on the caller's stream
    and the others each on a side stream alongside it (a small set's few programs would otherwise run alone:
    ~0.4 ms for the 95m model's conv-shaped matrices), forked from and joined to the caller's stream."""

    def __init__(self, shapes, schedule, eps, work_dtype, cfg, sym, muon, dtypes, device):
        self.anchors = [_anchor(dt, device) for dt in dtypes]  # g, mbuf, out
        sets = _sets(shapes, schedule, work_dtype, cfg, sym)
        self.order = np.concatenate([idx for idx, *_ in sets])  # row r of the tables: matrix order[r]
        self.io = torch.zeros(len(shapes), int(IO_COLS), dtype=torch.int64, device=device)
        self.hyper = torch.zeros(len(shapes), int(H_COLS), dtype=torch.float32, device=device)
        self.runners, r = [], 0
        for idx, dt, c, seg in sets:
            plan = _plan(tuple(shapes[i] for i in idx), c, sym, device)
            rows = slice(r, r + len(idx))
            self.runners.append(_Runner(plan, schedule, seg, eps, dt, c, sym, muon, self.anchors, self.io[rows],
                                        self.hyper[rows], device))  # fmt: skip
            r += len(idx)
        # a packed output (the non-Muon call): matrix k at out_offsets[k], [mo, ldg] row-major
        sizes = np.array([mo * _round(no) for mo, no in shapes], dtype=np.int64)
        self.out_offsets, self.out_size = np.cumsum(sizes) - sizes, int(sizes.sum())
        self.graph = None

    def offsets(self, ptrs: np.ndarray, which: int) -> np.ndarray:
        """Element offsets of addresses `ptrs` (int64) from anchor `which` (0: g, 1: mbuf, 2: out)."""
        anchor = self.anchors[which]
        return (ptrs - anchor.data_ptr()) // anchor.element_size()

    def launches(self) -> None:
        if not self.io.is_cuda or len(self.runners) == 1:
            for run in self.runners:
                run.launches()
            return
        main = torch.cuda.current_stream(self.io.device)
        streams = _SIDE_STREAMS.setdefault(self.io.device, [])
        while len(streams) < len(self.runners) - 1:
            streams.append(torch.cuda.Stream(self.io.device))
        sides = streams[: len(self.runners) - 1]
        for side, run in zip(sides, self.runners[1:], strict=True):
            side.wait_stream(main)
            with torch.cuda.stream(side):
                run.launches()
        self.runners[0].launches()
        for side in sides:
            main.wait_stream(side)

    def __call__(self, io: np.ndarray, hyper: np.ndarray | None, graphs: bool) -> None:
        """One call: io int64 [K, IO_COLS], hyper fp32 [K, H_COLS] (Muon) or None, rows in `shapes` order."""
        cuda = self.io.is_cuda
        for dst, src in ((self.io, io), (self.hyper, hyper)):
            if src is not None:
                src = torch.from_numpy(np.ascontiguousarray(src[self.order]))
                dst.copy_(src.pin_memory() if cuda else src, non_blocking=cuda)
        if graphs and self.graph is not None:
            self.graph.replay()
            return
        self.launches()
        if graphs and cuda and not torch.cuda.is_current_stream_capturing():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.launches()
            self.graph = graph


_CALLS: dict = {}
MAX_CALLS = 32


def _call(shapes, schedule, eps, work_dtype, cfg, sym, muon, dtypes, device) -> _Call:
    key = (shapes, schedule, eps, work_dtype, cfg, sym, muon, dtypes, device)
    if key not in _CALLS:
        if len(_CALLS) >= MAX_CALLS:
            _CALLS.pop(next(iter(_CALLS)))
        _CALLS[key] = _Call(shapes, schedule, eps, work_dtype, cfg, sym, muon, dtypes, device)
    return _CALLS[key]


def _aligned(G: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(T, N, stride between matrices): G itself when its rows are already ldg = round(n) elements long
    with ALIGN-aligned matrix starts, else a zero-padded copy [N, m, ldg] (the per-call Python here is
    kept small: Muon may pass ~130 separate matrices)."""
    mo, no = G.shape[-2:]
    N, s0 = (G.shape[0], G.stride(0)) if G.dim() == 3 else (1, 0)
    if _is_aligned(G) and s0 % ALIGN_N == 0:
        return G, N, s0
    Gp = G.new_zeros(N, mo, _round(no))
    Gp[..., :no] = G
    return Gp, N, mo * _round(no)


def _is_aligned(t: torch.Tensor) -> bool:
    """Rows contiguous, a multiple of ALIGN elements long, the start ALIGN-element aligned."""
    no, st = t.shape[-1], t.stride()
    return st[-1] == 1 and st[-2] == no and no % ALIGN_N == 0 and t.data_ptr() % (ALIGN_N * t.element_size()) == 0


def newton_schulz_triton(
    Gs: list[torch.Tensor],
    coeffs: list[tuple[float, float, float]],
    eps: float = 1e-7,
    work_dtype: torch.dtype = torch.bfloat16,
    sym: bool = True,
    config: Config | None = None,
    graphs: bool = True,
) -> list[torch.Tensor]:
    """Run len(coeffs) >= 1 quintic steps (step s uses coeffs[s]) on every matrix of every stack in `Gs`.

    Gs: [m, n] matrices or [N, m, n] stacks, any shapes, one float dtype, one device, validated by the
    caller. Returns one tensor per input, of its shape and dtype. Stacks with a side <= TINY (e.g. the
    [3024, 4] conv weight) use fp32 operands even when `work_dtype` is bf16: with only a few singular
    values, all about 1/sqrt(side) after normalization, the quintic's slope (up to ~3.5 near 1.2)
    amplifies bf16 rounding past 2e-2 relative error, while their cost is negligible.
    `work_dtype`: bf16 (the default), fp16 (Gram segments of 3 + 2 steps instead of 2 + 2 + 1; on the H100
    half the error, 6.7e-3 against 1.4e-2 for the 95m model's set, in the same time: profiles/ns.md) or fp32.
    `graphs`: replay the launches as one CUDA graph (CUDA only).
    """
    schedule = tuple(tuple(c) for c in coeffs)
    Ts = [_aligned(G) for G in Gs]
    dt, dev = Gs[0].dtype, Gs[0].device
    shapes = tuple(tuple(G.shape[-2:]) for G, (_, N, _) in zip(Gs, Ts, strict=True) for _ in range(N))
    call = _call(shapes, schedule, eps, work_dtype, config or Config(), sym, False, (dt, dt, dt), dev)
    starts = call.offsets(np.array([T.data_ptr() for T, _, _ in Ts], dtype=np.int64), 0)
    src = np.concatenate([s + s0 * np.arange(N) for s, (_, N, s0) in zip(starts, Ts, strict=True)])
    out = torch.empty(call.out_size, dtype=dt, device=dev)
    dst = call.offsets(np.array([out.data_ptr()], dtype=np.int64), 2) + call.out_offsets
    call(np.stack([src, np.zeros_like(src), dst], 1), None, graphs)
    outs = []
    for G, (T, N, _), O in zip(Gs, Ts, out.split([N * T.shape[-2] * T.shape[-1] for T, N, _ in Ts]), strict=True):
        if T.shape[-1] != G.shape[-1]:  # padded rows: [N, m, ldg] -> [N, m, n]
            O = O.view(N, *T.shape[-2:])[..., : G.shape[-1]].contiguous()
        outs.append(O.view(G.shape))
    return outs


def muon_addresses(ts: list[torch.Tensor]) -> np.ndarray | None:
    """The start addresses (int64) of CUDA tensors of one dtype that `muon_update_triton` can address in
    place (contiguous, rows a multiple of ALIGN elements long, starts ALIGN-element aligned), else None."""
    dt = ts[0].dtype
    if not all(t.is_cuda and t.dtype == dt and t.is_contiguous() and t.shape[-1] % ALIGN_N == 0 for t in ts):
        return None
    ptrs = np.array([t.data_ptr() for t in ts], dtype=np.int64)
    return None if (ptrs % (ALIGN_N * ts[0].element_size())).any() else ptrs


def muon_update_triton(
    params: list[torch.Tensor],
    addresses: tuple[np.ndarray, np.ndarray, np.ndarray],
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
    hyper: np.ndarray,
    coeffs: list[tuple[float, float, float]],
    eps: float = 1e-7,
    work_dtype: torch.dtype = torch.bfloat16,
    sym: bool = True,
    config: Config | None = None,
    graphs: bool = True,
) -> None:
    """Muon's whole update for 2-D matrices, in place: per matrix k, with (mu, nesterov, decay, alpha) =
    hyper[k] (fp32 [K, 4]),

        M <- mu M + G;   U <- G + mu M if nesterov else M;   W <- decay W - alpha NS(U)

    with NS = len(coeffs) quintic steps as in `newton_schulz_triton` (same sets, dtypes and tiles).
    `addresses`: `muon_addresses` of the gradients, momentum buffers and parameters; `dtypes`: theirs.
    Shapes (buffers and gradients those of the parameters) are validated by the caller.
    """
    shapes = tuple(tuple(p.shape) for p in params)
    schedule = tuple(tuple(c) for c in coeffs)
    call = _call(shapes, schedule, eps, work_dtype, config or Config(), sym, True, dtypes, params[0].device)
    call(np.stack([call.offsets(a, w) for w, a in enumerate(addresses)], 1), hyper, graphs)
