"""Triton Newton-Schulz: the quintic iteration of `reference.py` for many matrices in 3 launches a step.

Every matrix is handled in its wide orientation X [m, n] (m <= n) in a packed workspace; a tall input G
is read as G^T by indexing, never copied. Each launch runs over a tile table that spans every matrix of
every shape group, so a whole optimizer's set of matrices (any mix of shapes) costs 2 + 3 * steps
launches:

    stage 0:  X_0 = G                         prep: G (any float dtype, either orientation) -> workspace
    stage 1:  A = X X^T                       tiles of A [m, m], K = n
    stage 2:  B = b A + c A A^T               tiles of B [m, m], K = m    (A is symmetric: A^2 = A A^T)
    stage 3:  X' = a X + B X                  tiles of X' [m, n], K = m
    stage 4:  out = X                         finish: workspace -> G's layout and dtype

Operands are in the work dtype (bf16; fp32 with exact fp32 products for tests and for matrices with a
side <= TINY, see `newton_schulz_triton`), accumulation in fp32. A and B are symmetric, so with
`sym=True` the tables hold only the tiles on and above the diagonal and each off-diagonal tile is also
stored mirrored (half the FLOPs of stages 1 and 2).

Frobenius normalization is fused: step 0's stage 1 computes A' = G G^T unnormalized and writes
per-diagonal-tile partial traces (||G||_F^2 = tr(G G^T)); stage 2 scales its A' operands by 1 / s^2
with s = ||G||_F + eps, and stage 3 applies 1 / s in its epilogue: X_1 = (a G + B_0 G) / s.

On CUDA the 3 * steps stage launches are captured once per set of shapes into a CUDA graph and
replayed (the workspaces are static per shape set; calls on one stream are ordered, so reuse is safe).
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
def _ns_stage_kernel(
    tiles,  # int32 [T, 3]: (matrix, tile row, tile col)
    meta,  # int64 [K, META_COLS]
    g_off,  # int64 [K]: offset of matrix k from `g`, in elements (stage 0)
    g,  # input base pointer (stage 0)
    out,  # output base pointer (stage 4): matrix k at meta's out offset, in G's (padded) layout
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
    x_off = tl.multiple_of(tl.load(row + M_XOFF), ALIGN)
    a_off = tl.multiple_of(tl.load(row + M_AOFF), ALIGN)
    wdt = x_out.dtype.element_ty
    rows = i * BM + tl.arange(0, BM)
    cols = j * BN + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    if FIRST and STAGE > 1:  # s = ||G||_F + eps from stage 1's partial traces
        d = tl.arange(0, NDIAG)
        s = tl.sqrt(tl.sum(tl.load(trace + k * NDIAG + d, mask=d < tl.load(row + M_NDIAG), other=0.0))) + eps

    if STAGE == 0 or STAGE == 4:  # prep / finish: G <-> workspace X, tiles of [m, n]
        ldg = tl.multiple_of(tl.load(row + M_LDG).to(tl.int32), ALIGN)
        tall = tl.load(row + M_TALL) != 0
        if STAGE == 0:
            v = _g_load(g + tl.multiple_of(tl.load(g_off + k), ALIGN), rows, cols, m, n, ldg, tall).to(wdt)
            p, mask = _w_ptrs(x_out + x_off, rows, cols, m, ldx)
            tl.store(p, v, mask=mask)
        else:
            v = _w_tile(x_in + x_off, rows, cols, m, ldx).to(out.dtype.element_ty)
            _g_store(out + tl.multiple_of(tl.load(row + M_OOFF), ALIGN), v, rows, cols, m, n, ldg, tall)
    elif STAGE == 3:  # X' = a X + B X
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        bp = b_buf + a_off
        xp = x_in + x_off
        for k0 in range(0, lda, BK):
            acc = tl.dot(_w_tile(bp, rows, k0 + kk, m, lda), _w_tile(xp, k0 + kk, cols, m, ldx), acc,
                         input_precision=DOT_PREC)  # fmt: skip
        acc += coef_a * _w_tile(xp, rows, cols, m, ldx).to(tl.float32)
        if FIRST:  # X_1 = (a G + B_0 G) / s
            acc = acc / s
        p, mask = _w_ptrs(x_out + x_off, rows, cols, m, ldx)
        tl.store(p, acc.to(wdt), mask=mask)
    else:  # symmetric [m, m] products: A = X X^T (K = n) or B = b A + c A A^T (K = m)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if STAGE == 1:
            src, ld = x_in + x_off, ldx
        else:
            src, ld = a_buf + a_off, lda
        for k0 in range(0, ld, BK):
            lt = _w_tile(src, rows, k0 + kk, m, ld)
            rt = _w_tile(src, cols, k0 + kk, m, ld)
            if STAGE == 2 and FIRST:  # A_0 = A' / s^2
                lt = (lt.to(tl.float32) / (s * s)).to(wdt)
                rt = (rt.to(tl.float32) / (s * s)).to(wdt)
            acc = tl.dot(lt, tl.trans(rt), acc, input_precision=DOT_PREC)
        if STAGE == 1:
            if FIRST:  # ||G||_F^2 = tr(G G^T): this tile's share of the diagonal
                diag = tl.sum(tl.sum(tl.where(rows[:, None] == cols[None, :], acc, 0.0), axis=1), axis=0)
                tl.store(trace + k * NDIAG + i, diag, mask=i == j)
            dst = a_buf + a_off
        else:
            aij = _w_tile(src, rows, cols, m, lda).to(tl.float32)
            if FIRST:
                aij = aij / (s * s)
            acc = coef_c * acc + coef_b * aij
            dst = b_buf + a_off
        p, mask = _w_ptrs(dst, rows, cols, m, lda)
        tl.store(p, acc.to(wdt), mask=mask)
        if SYM:  # the mirror tile (j, i); the padding columns of row block j are covered as well
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


TINY = 8  # matrices with a side <= TINY run with fp32 operands (see newton_schulz_triton)
# their tiles: with 128-wide tiles the one [16, 16] tile of A = X X^T (K = 3024 for the conv weight)
# made 8 programs of mostly-masked fp32 products take 0.6 ms a step (measured on an H100)
TINY_CONFIG = Config(bs=16, bk=64, warps=4, stages=2, bm=16, bn=128, bk3=16, warps3=4, stages3=2)


class _Runner:
    """Static workspaces for one set of shapes and one schedule, and on CUDA the graph of its stage
    launches (captured after the first, eager, call)."""

    def __init__(self, plan: _Plan, schedule, eps, work_dtype, cfg: Config, sym: bool, device):
        self.plan, self.schedule, self.eps, self.cfg, self.sym = plan, schedule, eps, cfg, sym
        self.xs = [torch.zeros(plan.x_size, dtype=work_dtype, device=device) for _ in range(2)]
        self.a_buf = torch.zeros(plan.a_size, dtype=work_dtype, device=device)
        self.b_buf = torch.zeros_like(self.a_buf)
        self.trace = torch.zeros(plan.meta.shape[0] * plan.ndiag, dtype=torch.float32, device=device)
        self.prec = "ieee" if work_dtype == torch.float32 else "tf32"
        self.graph = None

    def launch(self, stage, g_off, g, out, x_in, x_out, coeffs=(0.0, 0.0, 0.0), first=False):
        cfg, plan = self.cfg, self.plan
        if stage in (1, 2):
            tiles, bm, bn, bk, warps, nst = plan.tiles_sym, cfg.bs, cfg.bs, cfg.bk, cfg.warps, cfg.stages
        else:
            tiles, bm, bn, bk, warps, nst = plan.tiles_x, cfg.bm, cfg.bn, cfg.bk3, cfg.warps3, cfg.stages3
        _ns_stage_kernel[(tiles.shape[0],)](
            tiles, plan.meta, g_off, g, out, x_in, x_out, self.a_buf, self.b_buf, self.trace, *coeffs, self.eps,
            STAGE=stage, FIRST=first, SYM=self.sym, NDIAG=plan.ndiag, BM=bm, BN=bn, BK=bk, DOT_PREC=self.prec,
            num_warps=warps, num_stages=nst,
        )  # fmt: skip

    def steps(self):
        """Stages 1-3 of every step: workspace only, so the same launches serve every call."""
        xs, dummy = self.xs, self.trace
        for step, coeffs in enumerate(self.schedule):
            for stage in (1, 2, 3):
                x_in, x_out = xs[step % 2], xs[(step + 1) % 2]
                self.launch(stage, dummy, dummy, dummy, x_in, x_out, coeffs, first=step == 0)

    def __call__(self, g_off: torch.Tensor, base: torch.Tensor, out: torch.Tensor, graphs: bool) -> None:
        self.launch(0, g_off, base, out, self.xs[1], self.xs[0])
        if graphs and self.graph is not None:
            self.graph.replay()
        else:
            self.steps()
            if graphs and base.is_cuda and not torch.cuda.is_current_stream_capturing():
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.steps()
                self.graph = graph
        self.launch(4, g_off, base, out, self.xs[len(self.schedule) % 2], self.xs[0])


_RUNNERS: dict = {}
MAX_RUNNERS = 32


def _runner(shapes, schedule, eps, work_dtype, cfg, sym, device) -> _Runner:
    key = (shapes, tuple(schedule), eps, work_dtype, cfg, sym, device)
    if key not in _RUNNERS:
        if len(_RUNNERS) >= MAX_RUNNERS:
            _RUNNERS.pop(next(iter(_RUNNERS)))
        _RUNNERS[key] = _Runner(_plan(shapes, cfg, sym, device), schedule, eps, work_dtype, cfg, sym, device)
    return _RUNNERS[key]


def _aligned(G: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(T, N, stride between matrices): G itself when its rows are already ldg = round(n) elements long
    with ALIGN-aligned matrix starts, else a zero-padded copy [N, m, ldg] (the per-call Python here is
    kept small: Muon may pass ~130 separate matrices)."""
    mo, no = G.shape[-2:]
    ldg, a, st = _round(no), int(ALIGN), G.stride()
    N, s0 = (G.shape[0], st[0]) if G.dim() == 3 else (1, 0)
    if st[-1] == 1 and st[-2] == no == ldg and s0 % a == 0 and G.data_ptr() % (a * G.element_size()) == 0:
        return G, N, s0
    Gp = G.new_zeros(N, mo, ldg)
    Gp[..., :no] = G
    return Gp, N, mo * ldg


def _run_group(Gs, coeffs, eps, work_dtype, sym, cfg, graphs) -> list[torch.Tensor]:
    Ts = [_aligned(G) for G in Gs]
    base = min((T for T, _, _ in Ts), key=lambda T: T.data_ptr())
    esize, dev, p0 = base.element_size(), base.device, base.data_ptr()
    shapes, g_off = [], []
    for G, (T, N, s0) in zip(Gs, Ts, strict=True):
        shapes += [tuple(G.shape[-2:])] * N
        off = (T.data_ptr() - p0) // esize
        g_off += [off + b * s0 for b in range(N)]
    run = _runner(tuple(shapes), coeffs, eps, work_dtype, cfg, sym, dev)
    g_t = torch.tensor(g_off, dtype=torch.int64)
    g_t = g_t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else g_t
    out = torch.empty(run.plan.out_size, dtype=base.dtype, device=dev)
    run(g_t, base, out, graphs)
    outs = []
    for G, (T, N, _), O in zip(Gs, Ts, out.split([N * T.shape[-2] * T.shape[-1] for T, N, _ in Ts]), strict=True):
        if T.shape[-1] != G.shape[-1]:  # padded rows: [N, m, ldg] -> [N, m, n]
            O = O.view(N, *T.shape[-2:])[..., : G.shape[-1]].contiguous()
        outs.append(O.view(G.shape))
    return outs


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
    `graphs`: replay the stage launches as a CUDA graph (CUDA only).
    """
    cfg, schedule = config or Config(), tuple(tuple(c) for c in coeffs)
    tiny = [work_dtype != torch.float32 and min(G.shape[-2:]) <= TINY for G in Gs]
    outs: list[torch.Tensor | None] = [None] * len(Gs)
    for flag, dt, c in ((False, work_dtype, cfg), (True, torch.float32, TINY_CONFIG)):
        idx = [i for i, t in enumerate(tiny) if t == flag]
        if idx:
            for i, O in zip(idx, _run_group([Gs[i] for i in idx], schedule, eps, dt, sym, c, graphs), strict=True):
                outs[i] = O
    return outs
