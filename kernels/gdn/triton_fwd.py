"""Forward Triton kernels of the chunked gated delta rule (chunk BT = 64), in two launches.

Notation and equations (3)-(5) are those of `reference.chunk_gated_delta_rule`.

1. `_prep_kernel`, one program per (chunk, head), all independent: the cumulative gate G, P of (4), the
   strictly lower A of (3), T = (I + A)^-1, and the WY factors U = T diag(beta) V, W_k = T diag(beta e^G) K.
   With the optional q/k L2 norm it also saves each row's r = (|x|^2 + eps)^-1/2 of q and k (fp32).
   q_hat = diag(r_q) Q and k_hat = diag(r_k) K are never formed: every kernel (forward and backward) keeps
   the raw q, k tiles as matmul operands and applies r to the fp32 factors around them (row scales of the
   products, or of the elementwise factors the tiles already get), so only the raw q and k are saved.
   T is formed by merging the inverses of diagonal blocks of doubling size s = 1, 2, .., BT / 2:
       [[T_1, 0], [A_21, T_2]]^-1 = [[T_1, 0], [-T_2 A_21 T_1, T_2]],  so  T_2s = T_s - (T_s A_s) T_s,      (6)
   with T_s block diagonal and A_s the blocks of A below the diagonal inside each 2s x 2s diagonal block:
   2 log2(BT) - 2 = 10 [BT, BT] products on the tensor cores (tf32 for 2-byte inputs), all on bounded operands.
   U and W_k take T diag(...) rounded to the input dtype, one tensor-core product each (as
   flash-linear-attention; its two-term bf16 split cost 25 us more at B64 on an H100 for errors 0.2% lower); the
   backward gets T itself rounded to the input dtype (bf16: half the bytes).
2. `_state_out_kernel`, one program per (head, V block), sequential over chunks: W = U - W_k S,
   the output (4) and the state update (5); it also saves S per chunk and W for the backward.

Inputs keep the [B, T, H, D] layout (the tail chunk is masked on load and store). Intermediate
buffers are head-major and padded to whole chunks, [B*H, NT*BT, D], so their tiles need no mask in time.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.common import addresses, carve_named, cdiv, launch_keyed, placeholder, views

BT = 64  # chunk length
NORM_EPS = 1e-6  # of the q/k L2 norm, as `kernels.gdn.l2norm`
# Launch configuration (H100, K = V = 112 / 128, from interleaved sweeps): warps, software-pipeline stages and
# V block of the sequential kernels (forward and backward: "state"), of the prep kernel and of the backward's
# chunk kernels (`_bwd_out_kernel`: "out", `_bwd_wy_kernel`: "wy"; warps shared). The sequential kernels need
# their loads pipelined: with Triton 3.6, single-stage builds gave wrong gradients (V block 16) or an illegal
# address (another operand order) on the H100; with bf16 tiles 3 stages beat 2 in every kernel with a loop,
# e.g. bwd_state 478 -> 380 us at B64 (~200 KB of shared memory; see `num_stages` for fp32). The chunk kernels
# part ways: bwd_out gains from a V block of 64 (614 -> 569 us at B64) where bwd_wy loses (556 -> 803), and
# bwd_wy from a 4th stage (556 -> 530) where bwd_out loses with the L2 norm (877 -> 891). prep has no loop and is
# latency-bound: capped at 168 registers it runs 3 programs per SM instead of 2 (it needs ~186 with the inverse of
# (6); ptxas spills 16-28 B): measured with an earlier inverse of the same product count (303 us at B64 against
# 432 uncapped; a cap of 128, 4 per SM, gave 402, 104 gave 660, 8 warps at 80 1464).
CONFIG = dict(prep_warps=4, prep_maxnreg=168, state_bv=64, state_warps=4, state_stages=3, out_bv=64, out_stages=3,
              wy_bv=32, wy_stages=4, chunk_warps=4)  # fmt: skip


@triton.jit
def _io_ptrs(ptr, bh, t0, T, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, c0):
    """Pointers and mask of rows t0.., columns c0.. (BD wide) of head bh of a [B, T, H, D] tensor."""
    b, h = bh // H, bh % H
    rows, cols = t0 + tl.arange(0, BT), c0 + tl.arange(0, BD)
    p = ptr + (b.to(tl.int64) * T * H + h) * D + rows[:, None] * (H * D) + cols[None, :]
    return p, (rows < T)[:, None] & (cols < D)[None, :]


@triton.jit
def _load_io(ptr, bh, t0, T, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, c0=0):
    p, m = _io_ptrs(ptr, bh, t0, T, H, D, BT, BD, c0)
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _store_io(ptr, x, bh, t0, T, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, c0=0):
    p, m = _io_ptrs(ptr, bh, t0, T, H, D, BT, BD, c0)
    tl.store(p, x, mask=m)


@triton.jit
def _buf_ptrs(ptr, bh, t0, Tp, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, c0):
    """Pointers and mask of rows t0.., columns c0.. of head bh of a padded [B*H, Tp, D] buffer."""
    rows, cols = t0 + tl.arange(0, BT), c0 + tl.arange(0, BD)
    p = ptr + bh.to(tl.int64) * Tp * D + rows[:, None] * D + cols[None, :]
    return p, (cols < D)[None, :]


@triton.jit
def _load_buf(ptr, bh, t0, Tp, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, c0=0):
    p, m = _buf_ptrs(ptr, bh, t0, Tp, D, BT, BD, c0)
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _store_buf(ptr, x, bh, t0, Tp, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, c0=0):
    p, m = _buf_ptrs(ptr, bh, t0, Tp, D, BT, BD, c0)
    tl.store(p, x, mask=m)


@triton.jit
def _state_ptrs(ptr, idx, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, v0, k0):
    """Pointers and mask of rows k0..k0+BK, columns v0..v0+BV of the [K, V] state number idx of a
    [..., K, V] tensor."""
    rows, cols = k0 + tl.arange(0, BK), v0 + tl.arange(0, BV)
    p = ptr + idx.to(tl.int64) * K * V + rows[:, None] * V + cols[None, :]
    return p, (rows < K)[:, None] & (cols < V)[None, :]


@triton.jit
def _load_state(ptr, idx, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, v0, k0=0):
    p, m = _state_ptrs(ptr, idx, K, V, BK, BV, v0, k0)
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _store_state(ptr, x, idx, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, v0):
    p, m = _state_ptrs(ptr, idx, K, V, BK, BV, v0, 0)
    tl.store(p, x, mask=m)


@triton.jit
def _state_or_zeros(ptr, idx, USE: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, v0):  # fmt: skip
    """The fp32 state `_load_state` reads when USE (an initial state or its gradient is given), else 0."""
    if USE:
        S = _load_state(ptr, idx, K, V, BK, BV, v0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    return S


@triton.jit
def _rows(ptr, bh, t0, T, H: tl.constexpr, BT: tl.constexpr):
    """Rows t0..t0+BT of head bh of a [B, T, H] tensor, as fp32, zero past T."""
    b, h = bh // H, bh % H
    t = t0 + tl.arange(0, BT)
    return tl.load(ptr + (b.to(tl.int64) * T + t) * H + h, mask=t < T, other=0.0).to(tl.float32)


@triton.jit
def _rstd_ptrs(Rn, bh, which: tl.constexpr, t0, Tp, BT: tl.constexpr):
    """Pointers to rows t0..t0+BT of the saved inverse norms of q (which = 0) or k (1), [B*H, 2, Tp] fp32."""
    return Rn + (bh.to(tl.int64) * 2 + which) * Tp + t0 + tl.arange(0, BT)


@triton.jit
def _rstd(Rn, bh, which: tl.constexpr, t0, Tp, BT: tl.constexpr, L2NORM: tl.constexpr):
    """Rows t0..t0+BT of r for q (which = 0) or k (1) when L2NORM, else ones (multiplications by them fold
    away at compile time)."""
    if L2NORM:
        r = tl.load(_rstd_ptrs(Rn, bh, which, t0, Tp, BT))
    else:
        r = tl.full([BT], 1.0, dtype=tl.float32)
    return r


@triton.jit
def _inverse_norm(sumsq, Rn, bh, which: tl.constexpr, t0, Tp, eps, L2NORM: tl.constexpr):
    """r = (|x|^2 + eps)^-1/2 from the rows' sums of squares |x|^2 of a q (which = 0) or k (1) tile, stored for
    the other kernels, when L2NORM; else ones (and `sumsq`, unused, is compiled away)."""
    if L2NORM:
        r = tl.rsqrt(sumsq + eps)
        tl.store(_rstd_ptrs(Rn, bh, which, t0, Tp, sumsq.shape[0]), r)
    else:
        r = tl.full([sumsq.shape[0]], 1.0, dtype=tl.float32)
    return r


@triton.jit
def _tile_offsets(bh, n, NT, BT: tl.constexpr):
    """Offsets of chunk n's [BT, BT] tile of head bh in a [B*H, NT, BT, BT] tensor (T and P)."""
    r = tl.arange(0, BT)
    return (bh.to(tl.int64) * NT + n) * BT * BT + r[:, None] * BT + r[None, :]


@triton.jit
def _gates(G, bh, t0, Tp, BT: tl.constexpr):
    """Rows t0..t0+BT of head bh of the padded cumulative gate [B*H, Tp], and its last row G_C."""
    p = G + bh.to(tl.int64) * Tp + t0
    return tl.load(p + tl.arange(0, BT)), tl.load(p + BT - 1)


@triton.jit
def _decay(G, INCLUSIVE: tl.constexpr):
    """Gamma_ij = exp(G_i - G_j) for j <= i (j < i unless INCLUSIVE), else 0; masked before the exp."""
    r = tl.arange(0, G.shape[0])
    keep = (r[:, None] >= r[None, :]) if INCLUSIVE else (r[:, None] > r[None, :])
    return tl.exp(tl.where(keep, G[:, None] - G[None, :], float("-inf")))


@triton.jit
def _unit_lower_inverse(A, PREC: tl.constexpr):
    """T = (I + A)^-1 for the strictly lower A of (3), [BT, BT] fp32, by merging the inverses of diagonal blocks
    of doubling size s (6): T_2 = I - A_1, then T_2s = T_s - (T_s A_s) T_s for s = 2 .. BT / 2, with A_s the
    blocks of A below the diagonal inside each 2s x 2s diagonal block; fp32 operands at PREC (tf32 for 2-byte
    inputs), fp32 accumulation. Every operand is a block of A or the inverse of a unit lower triangular block,
    both bounded, so the error is that of rounding them. The Neumann series of N = -A in doubling form,
    (I + N)(I + N^2)..., takes as many products but its partial sums reach ~C(63, 31) ~ 1e17 when a chunk's
    keys are alike and beta ~ 1: they cancel only in exact arithmetic (session 8 had it for a few commits: inf
    outputs on such inputs; `tests/test_gdn_triton.py` holds the case). On an H100 at (2, 1024, 9, 112), B64
    prep time: tf32 operands 404 us; bf16 operands 362 us with the same errors on random inputs but a 27%
    larger forward error on those alike keys (2.3e-2 against 1.8e-2; fla 0.6.0: 3.1e-2), so not taken
    (profiles/gdn.md)."""
    BT: tl.constexpr = A.shape[0]
    r = tl.arange(0, BT)
    X = tl.where(r[:, None] == r[None, :], 1.0, 0.0) - _blocks_below(A, r, 1)
    for i in tl.static_range(1, tl.constexpr(BT).value.bit_length() - 1):  # s = 2 .. BT / 2
        Y = tl.dot(X, _blocks_below(A, r, 1 << i), input_precision=PREC)
        X -= tl.dot(Y, X, input_precision=PREC)
    return X


@triton.jit
def _blocks_below(A, r, s: tl.constexpr):
    """A on the s x s blocks below the diagonal inside each 2s x 2s diagonal block (r: the row/column indices),
    else 0."""
    pair = (r[:, None] // (2 * s)) == (r[None, :] // (2 * s))
    return tl.where(pair & ((r[:, None] // s) > (r[None, :] // s)), A, 0.0)


@triton.jit
def _prep_kernel(
    q, k, v, g, beta, G, Tinv, Pm, Wk, U, Rn, scale, eps, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    L2NORM: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    n, bh = tl.program_id(0), tl.program_id(1)
    NT = tl.cdiv(T, BT)
    Tp = NT * BT
    t0 = n * BT
    r = tl.arange(0, BT)

    Gc = tl.cumsum(_rows(g, bh, t0, T, H, BT), 0)
    tl.store(G + bh.to(tl.int64) * Tp + t0 + r, Gc)
    b = _rows(beta, bh, t0, T, H, BT)
    kb = _load_io(k, bh, t0, T, H, K, BT, BK)
    qb = _load_io(q, bh, t0, T, H, K, BT, BK)
    # with the norm, |k_i|^2 is the diagonal of K K^T (fewer registers than a sum over the fp32 k tile)
    KK = tl.dot(kb, tl.trans(kb), input_precision=PREC)
    rk = _inverse_norm(tl.sum(tl.where(r[:, None] == r[None, :], KK, 0.0), 1), Rn, bh, 1, t0, Tp, eps, L2NORM)
    qf = qb.to(tl.float32)
    rq = _inverse_norm(tl.sum(qf * qf, 1), Rn, bh, 0, t0, Tp, eps, L2NORM)
    # P = scale (Q K^T * Gamma) of (4), used by both sequential kernels, stored before the inverse: its Gamma
    # (j <= i) serves A too, and nothing of it stays live across the inverse (176 registers instead of 255)
    gam = _decay(Gc, True)
    P = (scale * rq)[:, None] * tl.dot(qb, tl.trans(kb), input_precision=PREC) * rk[None, :] * gam
    p_tile = _tile_offsets(bh, n, NT, BT)
    tl.store(Pm + p_tile, P.to(Pm.dtype.element_ty))
    # (3): A_ij = beta_i exp(G_i - G_j) k_i . k_j for j < i (bf16 products are exact in the fp32 accumulator)
    A = tl.where(r[:, None] > r[None, :], (b * rk)[:, None] * KK * rk[None, :] * gam, 0.0)
    Tm = _unit_lower_inverse(A, PREC)
    tl.store(Tinv + p_tile, Tm.to(Tinv.dtype.element_ty))  # saved in the input dtype, for the backward

    # WY factors: U = T diag(beta) V, W_k = T diag(beta e^G) K, with the fp32 factors rounded to the input dtype
    vb = _load_io(v, bh, t0, T, H, V, BT, BV)
    u = tl.dot((Tm * b[None, :]).to(vb.dtype), vb, input_precision=PREC)
    _store_buf(U, u.to(U.dtype.element_ty), bh, t0, Tp, V, BT, BV)
    w = tl.dot((Tm * (b * tl.exp(Gc) * rk)[None, :]).to(kb.dtype), kb, input_precision=PREC)
    _store_buf(Wk, w.to(Wk.dtype.element_ty), bh, t0, Tp, K, BT, BK)


@triton.jit
def _state_out_kernel(
    q, k, G, Pm, Wk, U, Rn, h0, o, ht, hs, Wb, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, SAVE: tl.constexpr,
    L2NORM: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    iv, bh = tl.program_id(0), tl.program_id(1)
    NT = tl.cdiv(T, BT)
    Tp = NT * BT
    v0 = iv * BV
    dt = q.dtype.element_ty
    S = _state_or_zeros(h0, bh, USE_H0, K, V, BK, BV, v0)
    for n in range(NT):
        t0 = n * BT
        if SAVE:  # S entering chunk n
            _store_state(hs, S.to(dt), bh * NT + n, K, V, BK, BV, v0)
        qb = _load_io(q, bh, t0, T, H, K, BT, BK)
        kb = _load_io(k, bh, t0, T, H, K, BT, BK)
        wb = _load_buf(Wk, bh, t0, Tp, K, BT, BK)
        ub = _load_buf(U, bh, t0, Tp, V, BT, BV, v0)
        Gb, G_end = _gates(G, bh, t0, Tp, BT)

        Sd = S.to(dt)
        wf = ub.to(tl.float32) - tl.dot(wb, Sd, input_precision=PREC)  # W = U - W_k S
        w = wf.to(dt)
        if SAVE:
            _store_buf(Wb, w, bh, t0, Tp, V, BT, BV, v0)
        # (4): O = scale (diag(e^G) Q S + (Q K^T * Gamma) W)
        P = tl.load(Pm + _tile_offsets(bh, n, NT, BT))
        rq = _rstd(Rn, bh, 0, t0, Tp, BT, L2NORM)  # r loaded where used: loaded together, one spills
        ob = tl.dot(qb, Sd, input_precision=PREC) * (scale * rq * tl.exp(Gb))[:, None]
        ob = tl.dot(P, w, ob, input_precision=PREC)  # P holds the scale
        _store_io(o, ob.to(o.dtype.element_ty), bh, t0, T, H, V, BT, BV, v0)
        # (5): S <- e^{G_C} S + (e^{G_C - G} K)^T W = e^{G_C} S + K^T (diag(e^{G_C - G}) W): the row scales on
        # the V-block-wide W, not on the K-wide tile, which then feeds the product as loaded
        rk = _rstd(Rn, bh, 1, t0, Tp, BT, L2NORM)
        wd = (wf * (rk * tl.exp(G_end - Gb))[:, None]).to(dt)
        S = tl.dot(tl.trans(kb), wd, S * tl.exp(G_end), input_precision=PREC)
    if STORE_HT:
        _store_state(ht, S, bh, K, V, BK, BV, v0)


def _prec(x: torch.Tensor) -> str:
    """fp32 inputs get exact fp32 products; bf16 ones use bf16 tensor cores (tf32 for fp32 operands)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def pow2(x: int) -> int:
    """The smallest power of two >= x, at least 16 (the smallest tile side); on the host (triton's
    next_power_of_2, a constexpr function, costs microseconds per call)."""
    return max(16, 1 << (x - 1).bit_length())


def num_stages(kind: str, x: torch.Tensor) -> int:
    """Pipeline stages of the "state" (sequential), "out" or "wy" (chunk) kernels for inputs like x: CONFIG's
    for 2-byte inputs; 2 for fp32, whose tiles take twice the shared memory (at 3 stages the sequential kernels
    would need ~300 KB, over the H100's 227 KB)."""
    return CONFIG[f"{kind}_stages"] if x.element_size() == 2 else 2


def pick_bv(V: int) -> int:
    """V block of the sequential kernels."""
    return min(CONFIG["state_bv"], pow2(V))


SAVED = ("G", "Tinv", "Pm", "Wk", "Rn", "W", "hs")  # the forward's workspace, `saved_layout`


def saved_parts(B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype, l2norm: bool, save: bool) -> list:
    """The forward's intermediates for `carve`: the cumulative gate G [B*H, Tp] (fp32), T and P [B*H, NT, BT,
    BT] and W_k [B*H, Tp, K] (input dtype); the inverse norms of q and k [B*H, 2, Tp] (fp32) when `l2norm`;
    W [B*H, Tp, V] and the states entering each chunk [B*H, NT, K, V] (input dtype) when `save`."""
    NT = cdiv(T, BT)
    Tp, BH, f32 = NT * BT, B * H, torch.float32
    parts = [("G", f32, (BH, Tp)), ("Tinv", dtype, (BH, NT, BT, BT)), ("Pm", dtype, (BH, NT, BT, BT))]
    parts += [("Wk", dtype, (BH, Tp, K))] + [("Rn", f32, (BH, 2, Tp))] * l2norm
    return parts + [("W", dtype, (BH, Tp, V)), ("hs", dtype, (BH, NT, K, V))] * save


@functools.lru_cache(maxsize=256)
def saved_layout(B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype, l2norm: bool, save: bool) -> tuple:
    """`carve(saved_parts(...))` and the offsets of SAVED (None where absent), per shape."""
    return carve_named(saved_parts(B, T, H, K, V, dtype, l2norm, save), SAVED)


def op_facts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *flags) -> tuple:
    """What fixes the launches' specialization besides the addresses' alignment (the key of
    `kernels.common.launch_keyed`): device, shapes (grids, constexprs and the integer T), dtypes, CONFIG, and
    the caller's `flags` (options, dtypes of optional tensors)."""
    return (q.device, q.shape, v.shape[3], q.dtype, k.dtype, v.dtype, g.dtype, beta.dtype, *flags, *CONFIG.values())


def chunk_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    save: bool,
    l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Forward launches on contiguous inputs (q, k, v of one dtype), q and k L2-normalized inside the kernels
    when `l2norm`. Returns (o, the final state or None unless `output_final_state`, the uint8 workspace of
    `saved_layout`, which the backward takes)."""
    B, T, H, K = q.shape
    V = v.shape[3]
    dev, dt, scale = q.device, q.dtype, float(scale)
    size, layout, offsets = saved_layout(B, T, H, K, V, dt, l2norm, save)
    h0_dtype = initial_state.dtype if initial_state is not None else None
    facts = op_facts(q, k, v, g, beta, h0_dtype, output_final_state, save, l2norm)
    ws = torch.empty(size, dtype=torch.uint8, device=dev)
    U = torch.empty(B * H, cdiv(T, BT) * BT, V, dtype=dt, device=dev)  # not saved: its own, freed on return
    G, Tinv, Pm, Wk, Rn, W, hs = addresses(ws, offsets)
    io = [x.data_ptr() for x in (q, k, v, g, beta)]
    _prep(q, k, v, g, beta, ws, layout, U, scale, l2norm, facts, (*io, G, Tinv, Pm, Wk, U.data_ptr(), Rn))

    o = torch.empty_like(v)
    ht = torch.empty(B, H, K, V, device=dev, dtype=torch.float32) if output_final_state else None
    h0 = initial_state if initial_state is not None else placeholder(dev)
    ptrs = (io[0], io[1], G, Pm, Wk, U.data_ptr(), Rn, h0.data_ptr(), o.data_ptr(),
            G if ht is None else ht.data_ptr(), hs, W)  # fmt: skip
    _state_out(q, k, ws, layout, U, h0, o, ht, scale, initial_state is not None, save, l2norm, facts, ptrs)
    return o, ht, ws


def _prep(q, k, v, g, beta, ws, layout, U, scale: float, l2norm: bool, facts: tuple, ptrs: tuple) -> None:
    """`_prep_kernel`: G, T, P, W_k, (inverse norms) into the workspace, U."""
    B, T, H, K = q.shape
    V = v.shape[3]

    def first():
        G, Tinv, Pm, Wk, Rn = views(ws, layout, ("G", "Tinv", "Pm", "Wk", "Rn"))
        meta = dict(H=H, K=K, V=V, BT=BT, BK=pow2(K), BV=pow2(V), L2NORM=l2norm, PREC=_prec(q),
                    num_warps=CONFIG["prep_warps"], num_stages=1, maxnreg=CONFIG["prep_maxnreg"])  # fmt: skip
        args = (q, k, v, g, beta, G, Tinv, Pm, Wk, U, Rn, scale, NORM_EPS, T)
        return (cdiv(T, BT), B * H), args, meta

    launch_keyed(_prep_kernel, ("prep", *facts), first, ptrs, (scale, NORM_EPS, T))


def _state_out(q, k, ws, layout, U, h0, o, ht, scale: float, use_h0: bool, save: bool, l2norm: bool,
               facts: tuple, ptrs: tuple) -> None:  # fmt: skip
    """`_state_out_kernel`: o, the final state (ht, when given), and when `save` W and the states."""
    B, T, H, K = q.shape
    V = o.shape[3]

    def first():
        G, Pm, Wk, Rn, hs, W = views(ws, layout, ("G", "Pm", "Wk", "Rn", "hs", "W"))
        BV = pick_bv(V)
        meta = dict(H=H, K=K, V=V, BT=BT, BK=pow2(K), BV=BV, USE_H0=use_h0, STORE_HT=ht is not None, SAVE=save,
                    L2NORM=l2norm, PREC=_prec(q), num_warps=CONFIG["state_warps"],
                    num_stages=num_stages("state", q))  # fmt: skip
        args = (q, k, G, Pm, Wk, U, Rn, h0, o, G if ht is None else ht, hs, W, scale, T)  # G: ht not written
        return (cdiv(V, BV), B * H), args, meta

    launch_keyed(_state_out_kernel, ("state_out", *facts), first, ptrs, (scale, T))
