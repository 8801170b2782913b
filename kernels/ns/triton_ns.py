"""Triton Newton-Schulz: the quintic iteration of `reference.py` for many matrices in 3 launches a step.

Every matrix is handled in its wide orientation X [m, n] (m <= n); a tall input G is read as G^T by
indexing (its `tall` flag swaps the strides), never copied. One step is three stage launches, each
over a tile table that spans every matrix of every shape group, so the whole optimizer's set of
matrices (any mix of shapes) costs 3 launches a step:

    stage 1:  A = X X^T                       tiles of A [m, m], K = n
    stage 2:  B = b A + c A A^T               tiles of B [m, m], K = m    (A is symmetric: A^2 = A A^T)
    stage 3:  X' = a X + B X                  tiles of X' [m, n], K = m

Operands are in the work dtype (bf16; fp32 for tests), accumulation in fp32. A and B are symmetric,
so with `sym=True` the tables hold only the tiles on and above the diagonal and each off-diagonal
tile is also stored mirrored (half the FLOPs of stages 1 and 2).

Frobenius normalization is fused: step 0 reads G itself (any float dtype, any orientation), stage 1
stores A' = G G^T unnormalized and writes per-diagonal-tile partial traces (||G||_F^2 = tr(G G^T)),
stage 2 scales its A' operands by 1 / s^2 with s = ||G||_F + eps, and stage 3 applies 1 / s in its
epilogue: X_1 = (a G + B_0 G) / s. The last step's stage 3 writes straight into the output in G's
dtype and orientation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

# meta columns (int64, one row per matrix). Every row stride below is a multiple of ALIGN elements and
# the columns past a matrix's width are zeros, so the contiguous dimension of every tile is masked
# against a multiple of ALIGN (16-byte vector loads) and the zero padding adds nothing to any product.
M_M, M_N, M_LDX, M_LDA, M_XOFF, M_AOFF, M_NDIAG, M_TALL, M_OOFF, M_LDG = (tl.constexpr(c) for c in range(10))
META_COLS = tl.constexpr(10)
ALIGN = tl.constexpr(16)


@dataclass(frozen=True)
class Config:
    """Tile shapes: `bs` x `bs` tiles (K step `bk`) for the symmetric stages 1-2, `bm` x `bn` (K step
    `bk3`) for stage 3; warps and pipeline depth per stage."""

    bs: int = 128
    bk: int = 64
    warps: int = 8
    stages: int = 3
    bm: int = 128
    bn: int = 128
    bk3: int = 64
    warps3: int = 8
    stages3: int = 3


@triton.jit
def _g_tile(ptr, r, c, m, n, ldg, tall):
    """Pointers and mask of tile X[r, c] of the wide view X [m, n] of a row-major G with row stride `ldg`
    (X = G^T when `tall`; then m == ldg). The contiguous dimension is masked against ldg."""
    if tall:
        p = ptr + c[None, :] * ldg + r[:, None]
        mask = (r[:, None] < ldg) & (c[None, :] < n)
    else:
        p = ptr + r[:, None] * ldg + c[None, :]
        mask = (r[:, None] < m) & (c[None, :] < ldg)
    return p, mask


@triton.jit
def _w_tile(ptr, r, c, rows, ld):
    """Tile [r, c] of a row-major workspace matrix with `rows` rows and row stride `ld` (zero-padded)."""
    return tl.load(ptr + r[:, None] * ld + c[None, :], mask=(r[:, None] < rows) & (c[None, :] < ld), other=0.0)


@triton.jit
def _ns_stage_kernel(
    tiles,  # int32 [T, 3]: (matrix, tile row, tile col)
    meta,  # int64 [K, META_COLS]
    g_off,  # int64 [K]: offset of matrix k from `g`, in elements
    g,  # input base pointer (step 0 reads G here)
    out,  # output base pointer (the last step writes here, in G's layout)
    x_in,  # workspace X of the current step, wide, row-major, packed
    x_out,  # workspace X of the next step
    a_buf,  # workspace A (A' = G G^T unnormalized at step 0)
    b_buf,  # workspace B
    trace,  # fp32 [K, NDIAG]: partial traces of A' (diagonal tiles of stage 1 at step 0)
    coef_a,
    coef_b,
    coef_c,
    eps,
    STAGE: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    SYM: tl.constexpr,
    NDIAG: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    t = tl.program_id(0)
    k = tl.load(tiles + 3 * t)
    i = tl.load(tiles + 3 * t + 1)
    j = tl.load(tiles + 3 * t + 2)
    row = meta + k * META_COLS
    m = tl.load(row + M_M).to(tl.int32)
    n = tl.load(row + M_N).to(tl.int32)
    ldx = tl.multiple_of(tl.load(row + M_LDX).to(tl.int32), ALIGN)
    lda = tl.multiple_of(tl.load(row + M_LDA).to(tl.int32), ALIGN)
    ldg = tl.multiple_of(tl.load(row + M_LDG).to(tl.int32), ALIGN)
    xp = x_in + tl.multiple_of(tl.load(row + M_XOFF), ALIGN)
    a_off = tl.multiple_of(tl.load(row + M_AOFF), ALIGN)
    tall = tl.load(row + M_TALL) != 0
    gp = g + tl.multiple_of(tl.load(g_off + k), ALIGN)
    wdt = x_out.dtype.element_ty
    rows = i * BM + tl.arange(0, BM)
    cols = j * BN + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    if FIRST and STAGE > 1:  # s = ||G||_F + eps from stage 1's partial traces
        d = tl.arange(0, NDIAG)
        s = tl.sqrt(tl.sum(tl.load(trace + k * NDIAG + d, mask=d < tl.load(row + M_NDIAG), other=0.0))) + eps
    acc = tl.zeros((BM, BN), dtype=tl.float32)

    if STAGE == 1:  # A = X X^T (A' = G G^T at step 0)
        for k0 in range(0, ldx, BK):
            if FIRST:
                p, mask = _g_tile(gp, rows, k0 + kk, m, n, ldg, tall)
                lt = tl.load(p, mask=mask, other=0.0).to(wdt)
                p, mask = _g_tile(gp, cols, k0 + kk, m, n, ldg, tall)
                rt = tl.load(p, mask=mask, other=0.0).to(wdt)
            else:
                lt = _w_tile(xp, rows, k0 + kk, m, ldx)
                rt = _w_tile(xp, cols, k0 + kk, m, ldx)
            acc = tl.dot(lt, tl.trans(rt), acc, input_precision=DOT_PREC)
        if FIRST:  # ||G||_F^2 = tr(G G^T): this tile's share of the diagonal
            part = tl.sum(tl.sum(tl.where(rows[:, None] == cols[None, :], acc, 0.0), axis=1), axis=0)
            tl.store(trace + k * NDIAG + i, part, mask=i == j)
        dst = a_buf + a_off
    elif STAGE == 2:  # B = b A + c A A^T
        ap = a_buf + a_off
        for k0 in range(0, lda, BK):
            lt = _w_tile(ap, rows, k0 + kk, m, lda)
            rt = _w_tile(ap, cols, k0 + kk, m, lda)
            if FIRST:  # A_0 = A' / s^2
                lt = (lt.to(tl.float32) / (s * s)).to(wdt)
                rt = (rt.to(tl.float32) / (s * s)).to(wdt)
            acc = tl.dot(lt, tl.trans(rt), acc, input_precision=DOT_PREC)
        aij = _w_tile(ap, rows, cols, m, lda).to(tl.float32)
        if FIRST:
            aij = aij / (s * s)
        acc = coef_c * acc + coef_b * aij
        dst = b_buf + a_off
    else:  # X' = a X + B X
        bp = b_buf + a_off
        for k0 in range(0, lda, BK):
            lt = _w_tile(bp, rows, k0 + kk, m, lda)
            if FIRST:
                p, mask = _g_tile(gp, k0 + kk, cols, m, n, ldg, tall)
                rt = tl.load(p, mask=mask, other=0.0).to(wdt)
            else:
                rt = _w_tile(xp, k0 + kk, cols, m, ldx)
            acc = tl.dot(lt, rt, acc, input_precision=DOT_PREC)
        if FIRST:  # X_1 = (a G + B_0 G) / s
            p, mask = _g_tile(gp, rows, cols, m, n, ldg, tall)
            acc = (coef_a * tl.load(p, mask=mask, other=0.0).to(wdt).to(tl.float32) + acc) / s
        else:
            acc = coef_a * _w_tile(xp, rows, cols, m, ldx).to(tl.float32) + acc
        if LAST:
            p, mask = _g_tile(out + tl.multiple_of(tl.load(row + M_OOFF), ALIGN), rows, cols, m, n, ldg, tall)
            tl.store(p, acc.to(out.dtype.element_ty), mask=mask)
        else:
            xo = x_out + tl.multiple_of(tl.load(row + M_XOFF), ALIGN)
            tl.store(
                xo + rows[:, None] * ldx + cols[None, :], acc.to(wdt), mask=(rows[:, None] < m) & (cols[None, :] < ldx)
            )

    if STAGE < 3:  # store the [m, m] tile, and its mirror when only upper tiles are computed
        tl.store(
            dst + rows[:, None] * lda + cols[None, :], acc.to(wdt), mask=(rows[:, None] < m) & (cols[None, :] < lda)
        )
        if SYM:
            mask = (cols[None, :] < m) & (rows[:, None] < lda) & (i != j)
            tl.store(dst + cols[None, :] * lda + rows[:, None], acc.to(wdt), mask=mask)


@dataclass(frozen=True)
class _Plan:
    meta: torch.Tensor  # int64 [K, META_COLS]
    tiles_sym: torch.Tensor  # int32 [T12, 3], tiles of the [m, m] stages
    tiles_x: torch.Tensor  # int32 [T3, 3], tiles of the [m, n] stage
    x_size: int
    a_size: int
    out_size: int
    ndiag: int


def _round(x: int, to: int = int(ALIGN)) -> int:
    return -(-x // to) * to


@lru_cache(maxsize=64)
def _plan(shapes: tuple[tuple[int, int], ...], cfg: Config, sym: bool, device: torch.device) -> _Plan:
    """Meta rows and tile tables for a list of matrix shapes [mo, no] (one entry per matrix).

    G and the output are seen as [mo, ldg] row-major (ldg = no rounded up to ALIGN, zero columns past
    no); the wide view is X = G ([mo, ldg]) or X = G^T ([ldg, mo], zero rows past no) when mo > no.
    """
    rows, x_off, a_off, o_off = [], 0, 0, 0
    for mo, no in shapes:
        ldg, tall = _round(no), mo > no
        m, n = (ldg, mo) if tall else (mo, ldg)
        ldx, lda = _round(n), _round(m)
        rows.append([m, n, ldx, lda, x_off, a_off, triton.cdiv(m, cfg.bs), int(tall), o_off, ldg])
        x_off, a_off, o_off = x_off + m * ldx, a_off + m * lda, o_off + mo * ldg
    ndiag = max(16, triton.next_power_of_2(max(r[M_NDIAG] for r in rows)))  # one compiled variant for most
    # longest K first (stage 1: K = n; stages 2-3: K = m), the tiles of one matrix together for L2 reuse
    by_n = sorted(range(len(rows)), key=lambda k: -rows[k][M_N])
    by_m = sorted(range(len(rows)), key=lambda k: -rows[k][M_M])
    t_sym = [(k, i, j) for k in by_n for i in range(rows[k][M_NDIAG]) for j in range(i if sym else 0, rows[k][M_NDIAG])]
    t_x = [
        (k, i, j)
        for k in by_m
        for i in range(triton.cdiv(rows[k][M_M], cfg.bm))
        for j in range(triton.cdiv(rows[k][M_N], cfg.bn))
    ]

    def dev(v, dt):
        return torch.tensor(v, dtype=dt).to(device)

    return _Plan(dev(rows, torch.int64), dev(t_sym, torch.int32), dev(t_x, torch.int32), x_off, a_off, o_off, ndiag)


def _aligned(G: torch.Tensor) -> torch.Tensor:
    """G as a [N, mo, ldg] stack with rows padded by zeros to ldg and ALIGN-aligned starts (a copy only
    when G's own layout is not already that)."""
    G3 = G if G.dim() == 3 else G.unsqueeze(0)
    N, mo, no = G3.shape
    ldg, a = _round(no), int(ALIGN)
    ok = G3.stride(2) == 1 and G3.stride(1) == ldg and (N == 1 or G3.stride(0) % a == 0)
    if ok and no == ldg and G3.data_ptr() % (a * G3.element_size()) == 0:
        return G3
    Gp = G3.new_zeros(N, mo, ldg)
    Gp[..., :no] = G3
    return Gp


def newton_schulz_triton(
    Gs: list[torch.Tensor],
    coeffs: list[tuple[float, float, float]],
    eps: float = 1e-7,
    work_dtype: torch.dtype = torch.bfloat16,
    sym: bool = True,
    config: Config | None = None,
) -> list[torch.Tensor]:
    """Run len(coeffs) >= 1 quintic steps (step s uses coeffs[s]) on every matrix of every stack in `Gs`.

    Gs: [m, n] matrices or [N, m, n] stacks, any shapes, one float dtype, one device, validated by the
    caller. Returns one tensor per input, of its shape and dtype.
    """
    cfg = config or Config()
    G3s = [_aligned(G) for G in Gs]
    base = min(G3s, key=lambda G: G.data_ptr())
    esize = base.element_size()
    shapes, g_off = [], []
    for G, G3 in zip(Gs, G3s, strict=True):
        off = (G3.data_ptr() - base.data_ptr()) // esize
        shapes += [tuple(G.shape[-2:])] * G3.shape[0]
        g_off += [off + b * G3.stride(0) for b in range(G3.shape[0])]
    plan = _plan(tuple(shapes), cfg, sym, base.device)
    dev = base.device
    g_off_t = torch.tensor(g_off, dtype=torch.int64).to(dev)
    out = torch.empty(plan.out_size, dtype=base.dtype, device=dev)
    xs = [torch.empty(plan.x_size, dtype=work_dtype, device=dev) for _ in range(2)]
    a_buf = torch.empty(plan.a_size, dtype=work_dtype, device=dev)
    b_buf = torch.empty_like(a_buf)
    trace = torch.empty(len(shapes) * plan.ndiag, dtype=torch.float32, device=dev)
    prec = "ieee" if work_dtype == torch.float32 else "tf32"
    stage_cfg = {
        1: (plan.tiles_sym, cfg.bs, cfg.bs, cfg.bk, cfg.warps, cfg.stages),
        2: (plan.tiles_sym, cfg.bs, cfg.bs, cfg.bk, cfg.warps, cfg.stages),
        3: (plan.tiles_x, cfg.bm, cfg.bn, cfg.bk3, cfg.warps3, cfg.stages3),
    }
    for step, (ca, cb, cc) in enumerate(coeffs):
        for stage, (tiles, bm, bn, bk, warps, nst) in stage_cfg.items():
            _ns_stage_kernel[(tiles.shape[0],)](
                tiles, plan.meta, g_off_t, base, out, xs[step % 2], xs[(step + 1) % 2], a_buf, b_buf, trace,
                ca, cb, cc, eps,
                STAGE=stage, FIRST=step == 0, LAST=stage == 3 and step == len(coeffs) - 1, SYM=sym, NDIAG=plan.ndiag,
                BM=bm, BN=bn, BK=bk, DOT_PREC=prec, num_warps=warps, num_stages=nst,
            )  # fmt: skip
    outs, o = [], 0
    for G, G3 in zip(Gs, G3s, strict=True):
        size = G3.numel()
        O = out[o : o + size].view(G3.shape)
        if O.shape[-1] != G.shape[-1]:
            O = O[..., : G.shape[-1]].contiguous()
        outs.append(O.view(G.shape))
        o += size
    return outs
