"""Backward Triton kernels of the chunked gated delta rule, in three launches.

Per chunk, with S the state entering it, S' the one leaving it, W = U - W_k S, P = Q K^T * Gamma and
K_d = diag(e^{G_C - G}) K (equations (3)-(5) of `reference.chunk_gated_delta_rule`):

    dW  = scale P^T dO + K_d dS'                                                           (7)
    dS  = scale (diag(e^G) Q)^T dO + e^{G_C} dS' - W_k^T dW                                 (8)

1. `_bwd_state_kernel`, one program per (head, V block), sequential from the last chunk: (7), (8);
   saves dS' per chunk and dW, and returns dS_0 as the initial-state gradient.
2. `_bwd_out_kernel`, one program per (chunk, head, 64 key columns), all independent: dq, and the parts of
   dk (stored in the input dtype) and dG that flow through the output (4) and the state update (5).
3. `_bwd_wy_kernel`, one program per (chunk, head): dv, dbeta and the rest of dk and dG through the WY
   factors and (3), with dU = dW, dW_k = -dW S^T, dT = dU (diag(beta) V)^T + dW_k (diag(beta e^G) K)^T and
   dA = -(T^T dT T^T) on the strictly lower part (T = (I + A)^-1, saved in the input dtype: with bf16, its
   products take the fp32 factors rounded to bf16; split in two bf16 terms, x = hi + lo, they took 46 us
   more at B64 on an H100 for gradients' errors at most 1.3% lower); dg is the reversed
   in-chunk cumulative sum of dG. Two chunk kernels instead of one keep each under the register file (fewer
   live accumulators; one kernel doing both per chunk spilled and took 1402 us at B64 against 567 + 525).

With the q/k L2 norm (x_hat = diag(r) x, r = (|x|^2 + eps)^-1/2 per row, see `triton_fwd`), every kernel
applies the forward's r to the fp32 factors around the raw q, k tiles, the gradients above are those of
q_hat and k_hat, and both go through the norm:  dx = r (d x_hat - x_hat <x_hat, d x_hat>).             (9)
dk in `_bwd_wy_kernel`, which holds whole rows. dq in `_bwd_out_kernel`, whose programs hold 64 columns of
a row, with the row dot from the saved output: O_i is linear in q_hat_i and q_hat_i enters nothing else,
so <q_hat_i, d q_hat_i> = <O_i, dO_i>.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.common import addresses, carve_named, cdiv, launch_keyed, placeholder, views
from kernels.gdn.triton_fwd import (
    BT,
    CONFIG,
    SAVED,
    _decay,
    _gates,
    _load_buf,
    _load_io,
    _load_state,
    _prec,
    _rows,
    _rstd,
    _state_or_zeros,
    _store_buf,
    _store_io,
    _store_state,
    _tile_offsets,
    num_stages,
    op_facts,
    pick_bv,
    pow2,
    saved_layout,
)


@triton.jit
def _bwd_state_kernel(
    q, k, G, Pm, Wk, Rn, do, dht, dhs, dW, dh0, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, L2NORM: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    iv, bh = tl.program_id(0), tl.program_id(1)
    NT = tl.cdiv(T, BT)
    Tp = NT * BT
    v0 = iv * BV
    dt = q.dtype.element_ty
    dS = _state_or_zeros(dht, bh, USE_DHT, K, V, BK, BV, v0)
    for m in range(NT):
        n = NT - 1 - m
        t0 = n * BT
        _store_state(dhs, dS.to(dt), bh * NT + n, K, V, BK, BV, v0)
        qb = _load_io(q, bh, t0, T, H, K, BT, BK)
        kb = _load_io(k, bh, t0, T, H, K, BT, BK)
        wb = _load_buf(Wk, bh, t0, Tp, K, BT, BK)
        dob = _load_io(do, bh, t0, T, H, V, BT, BV, v0)
        Gb, G_end = _gates(G, bh, t0, Tp, BT)
        rq, rk = _rstd(Rn, bh, 0, t0, Tp, BT, L2NORM), _rstd(Rn, bh, 1, t0, Tp, BT, L2NORM)

        dSd = dS.to(dt)
        P = tl.load(Pm + _tile_offsets(bh, n, NT, BT))
        kd = (kb.to(tl.float32) * (rk * tl.exp(G_end - Gb))[:, None]).to(dt)
        dw = tl.dot(tl.trans(P), dob, input_precision=PREC)  # (7); P holds the scale
        dw = tl.dot(kd, dSd, dw, input_precision=PREC).to(dt)
        _store_buf(dW, dw, bh, t0, Tp, V, BT, BV, v0)
        qd = (qb.to(tl.float32) * (scale * rq * tl.exp(Gb))[:, None]).to(dt)
        dS = tl.dot(tl.trans(qd), dob, dS * tl.exp(G_end), input_precision=PREC)  # (8)
        dS -= tl.dot(tl.trans(wb), dw, input_precision=PREC)
    if STORE_DH0:
        _store_state(dh0, dS, bh, K, V, BK, BV, v0)


@triton.jit
def _bwd_out_kernel(
    q, k, G, hs, dhs, Wb, do, o, Rn, dq, dk_o, dG_o, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BKH: tl.constexpr, BV: tl.constexpr,
    L2NORM: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Gradients through the output (4) and the state update (5) of chunk n, for key columns k0..k0+BKH:
    those columns of dq and of the part of dk, and this slice's part of dG (dG_C folded into the last row),
    a sum over K; `_bwd_wy_kernel` completes dk and dG."""
    NK = tl.cdiv(K, BKH)
    n, ik, bh = tl.program_id(0) // NK, tl.program_id(0) % NK, tl.program_id(1)  # a chunk's K slices side by side
    NT = tl.cdiv(T, BT)
    Tp = NT * BT
    t0, k0 = n * BT, ik * BKH
    dt = q.dtype.element_ty
    r = tl.arange(0, BT)
    qb = _load_io(q, bh, t0, T, H, K, BT, BKH, k0)
    kb = _load_io(k, bh, t0, T, H, K, BT, BKH, k0)
    Gb, G_end = _gates(G, bh, t0, Tp, BT)
    rq, rk = _rstd(Rn, bh, 0, t0, Tp, BT, L2NORM), _rstd(Rn, bh, 1, t0, Tp, BT, L2NORM)

    # sums over V: dO S^T, dO W^T, W dS'^T, and the rows of S * dS'
    dQs = tl.zeros([BT, BKH], dtype=tl.float32)
    dKd = tl.zeros([BT, BKH], dtype=tl.float32)
    dOW = tl.zeros([BT, BT], dtype=tl.float32)
    dGs = tl.zeros([BKH], dtype=tl.float32)
    dOO = tl.zeros([BT], dtype=tl.float32)
    if L2NORM:  # O's tiles read one V block ahead: the loop's pipelining streams only its products' operands
        ob = _load_io(o, bh, t0, T, H, V, BT, BV)
    for v0 in range(0, V, BV):
        dob = _load_io(do, bh, t0, T, H, V, BT, BV, v0)
        if L2NORM:  # <dO_i, O_i> = <q_hat_i, d q_hat_i>, for (9)
            ob_next = _load_io(o, bh, t0, T, H, V, BT, BV, v0 + BV)  # none past V (masked)
            dOO += tl.sum(dob.to(tl.float32) * ob.to(tl.float32), 1)
            ob = ob_next
        S = _load_state(hs, bh * NT + n, K, V, BKH, BV, v0, k0)
        dSn = _load_state(dhs, bh * NT + n, K, V, BKH, BV, v0, k0)
        wb = _load_buf(Wb, bh, t0, Tp, V, BT, BV, v0)
        dQs = tl.dot(dob, tl.trans(S), dQs, input_precision=PREC)
        dOW = tl.dot(dob, tl.trans(wb), dOW, input_precision=PREC)
        dKd = tl.dot(wb, tl.trans(dSn), dKd, input_precision=PREC)
        dGs += tl.sum(S.to(tl.float32) * dSn.to(tl.float32), 1)

    # output (4): O = scale (diag(e^G) Q S + (Q K^T * Gamma) W); Q, K = diag(rq) q, diag(rk) k (raw q, k tiles)
    eG = tl.exp(Gb)
    dP = scale * dOW * _decay(Gb, True)
    dqb = tl.dot((dP * rk[None, :]).to(dt), kb, scale * eG[:, None] * dQs, input_precision=PREC)
    if L2NORM:  # (9)
        dqb = rq[:, None] * dqb - (rq * rq * dOO)[:, None] * qb.to(tl.float32)
    _store_io(dq, dqb.to(dq.dtype.element_ty), bh, t0, T, H, K, BT, BKH, k0)
    dkb = tl.dot(tl.trans((dP * rq[:, None]).to(dt)), qb, input_precision=PREC)
    M = dP * (rq[:, None] * tl.dot(qb, tl.trans(kb), input_precision=PREC) * rk[None, :])  # dL/dG from Gamma
    dG = scale * eG * rq * tl.sum(dQs * qb.to(tl.float32), 1) + tl.sum(M, 1) - tl.sum(M, 0)
    # state update (5): S' = e^{G_C} S + K_d^T W, K_d = diag(e^{G_C - G}) K
    ed = tl.exp(G_end - Gb)
    dkb += ed[:, None] * dKd
    t_kd = ed * rk * tl.sum(kb.to(tl.float32) * dKd, 1)
    dG -= t_kd
    dG += tl.where(r == BT - 1, tl.sum(dGs) * tl.exp(G_end) + tl.sum(t_kd), 0.0)  # G_C is the last row of G
    _store_buf(dk_o, dkb.to(dk_o.dtype.element_ty), bh, t0, Tp, K, BT, BKH, k0)
    tl.store(dG_o + (ik * tl.num_programs(1) + bh).to(tl.int64) * Tp + t0 + r, dG)


@triton.jit
def _bwd_wy_kernel(
    k, v, beta, G, Tinv, hs, dW, dk_o, dG_o, Rn, dk, dv, dg, dbeta, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BKH: tl.constexpr,
    BV: tl.constexpr, L2NORM: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Gradients through the WY factors and (3) of chunk n, with dU = dW and dW_k = -dW S^T: dv, dbeta, and
    dk, dg completed from `_bwd_out_kernel`'s parts (dg_i = sum_{j >= i} dG_j within the chunk); with the
    L2 norm, dk through it by (9)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    NT = tl.cdiv(T, BT)
    Tp = NT * BT
    t0 = n * BT
    r = tl.arange(0, BT)
    kb = _load_io(k, bh, t0, T, H, K, BT, BK)  # raw keys: K = diag(rk) kb
    Gb, _ = _gates(G, bh, t0, Tp, BT)
    b = _rows(beta, bh, t0, T, H, BT)
    Tt = tl.trans(tl.load(Tinv + _tile_offsets(bh, n, NT, BT)))  # in the input dtype

    # sums over V: dW S^T, dU (beta V)^T; dv = beta T^T dU directly
    dWk = tl.zeros([BT, BK], dtype=tl.float32)
    dT = tl.zeros([BT, BT], dtype=tl.float32)
    db = tl.zeros([BT], dtype=tl.float32)
    for v0 in range(0, V, BV):
        vb = _load_io(v, bh, t0, T, H, V, BT, BV, v0)
        S = _load_state(hs, bh * NT + n, K, V, BK, BV, v0)
        dwb = _load_buf(dW, bh, t0, Tp, V, BT, BV, v0)
        dWk = tl.dot(dwb, tl.trans(S), dWk, input_precision=PREC)
        dT += tl.dot(dwb, tl.trans(vb), input_precision=PREC) * b[None, :]
        du = tl.dot(Tt, dwb, input_precision=PREC)  # d(diag(beta) V) = T^T dU
        _store_io(dv, (b[:, None] * du).to(dv.dtype.element_ty), bh, t0, T, H, V, BT, BV, v0)
        db += tl.sum(du * vb.to(tl.float32), 1)

    # W_k = T diag(beta e^G) K
    kf = kb.to(tl.float32)
    rk = _rstd(Rn, bh, 1, t0, Tp, BT, L2NORM)  # loaded after the loop: live through it, it spills
    eG = tl.exp(Gb)
    be = b * eG
    dWk = -dWk
    dWkl = dWk.to(kb.dtype)  # one term in both products (see the module doc)
    dT += tl.dot(dWkl, tl.trans(kb), input_precision=PREC) * (be * rk)[None, :]
    dKw = tl.dot(Tt, dWkl, input_precision=PREC)
    dkb = _load_buf(dk_o, bh, t0, Tp, K, BT, BK).to(tl.float32) + be[:, None] * dKw
    s_k = rk * tl.sum(kf * dKw, 1)
    db += eG * s_k
    dG = be * s_k
    for ik in range(tl.cdiv(K, BKH)):  # the K slices' parts from `_bwd_out_kernel`
        dG += tl.load(dG_o + (ik * tl.num_programs(1) + bh).to(tl.int64) * Tp + t0 + r)
    # (3): A = diag(beta) (K K^T) * Gamma_strict, dA = -(T^T dT T^T) below the diagonal
    dTT = tl.dot(Tt, dT.to(Tt.dtype), input_precision=PREC)  # one term per fp32 factor (see the module doc)
    dA = -tl.dot(dTT.to(Tt.dtype), Tt, input_precision=PREC) * _decay(Gb, False)
    kk = rk[:, None] * tl.dot(kb, tl.trans(kb), input_precision=PREC) * rk[None, :]
    db += tl.sum(dA * kk, 1)
    dKK = b[:, None] * dA
    M = dKK * kk
    dG += tl.sum(M, 1) - tl.sum(M, 0)
    dkb += tl.dot(((dKK + tl.trans(dKK)) * rk[None, :]).to(kb.dtype), kb, input_precision=PREC)  # one term
    dgb = tl.sum(dG, 0) - tl.cumsum(dG, 0) + dG

    if L2NORM:  # k read again: its fp32 copy above would stay live through the products in between
        dkb = _l2norm_bwd(_load_io(k, bh, t0, T, H, K, BT, BK), rk, dkb)
    _store_io(dk, dkb.to(dk.dtype.element_ty), bh, t0, T, H, K, BT, BK)
    bi, hi = bh // H, bh % H
    t = t0 + r
    p_row = (bi.to(tl.int64) * T + t) * H + hi
    tl.store(dg + p_row, dgb.to(dg.dtype.element_ty), mask=t < T)
    tl.store(dbeta + p_row, db.to(dbeta.dtype.element_ty), mask=t < T)


@triton.jit
def _l2norm_bwd(x, r, dy):
    """(9): the gradient of x through x_hat = diag(r) x (rows of x, their r, d x_hat in fp32), in fp32."""
    y = x.to(tl.float32) * r[:, None]
    return r[:, None] * (dy - y * tl.sum(y * dy, 1)[:, None])


def pick_bv_chunk(kind: str, V: int) -> int:
    """V block of the loop over V in `_bwd_out_kernel` (kind "out") or `_bwd_wy_kernel` ("wy")."""
    return min(CONFIG[f"{kind}_bv"], pow2(V))


def chunk_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    ws: torch.Tensor,
    o: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    need_dh0: bool,
    l2norm: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Backward launches on the forward's inputs and workspace `ws` (`saved_layout` with `save`: G, T, P, W_k,
    the states, W and, used when `l2norm`, the inverse norms of q and k; the output o too when `l2norm`), do and
    dht in any layout. Returns (dq, dk, dv, dg, dbeta, dh0): dh0 [B, H, K, V] fp32 when `need_dh0`, else
    None."""
    do = do.contiguous()
    dht = dht.contiguous() if dht is not None else None  # the gradient of S_T.sum() is a stride-0 expand
    B, T, H, K = q.shape
    V = v.shape[3]
    dev, dt, scale = q.device, q.dtype, float(scale)
    _, saved, offsets = saved_layout(B, T, H, K, V, dt, l2norm, True)
    facts = op_facts(q, k, v, g, beta, do.dtype, None if dht is None else dht.dtype, need_dh0, l2norm)
    size, layout, tmp_offsets = _temp_layout(B, T, H, K, V, dt)
    G, Tinv, Pm, Wk, Rn, W, hs = addresses(ws, offsets)
    tmp = torch.empty(size, dtype=torch.uint8, device=dev)
    dhs, dW, dk_o, dG_o = addresses(tmp, tmp_offsets)
    q_ptr, k_ptr, do_ptr = q.data_ptr(), k.data_ptr(), do.data_ptr()

    def typed():  # the workspaces' arrays as typed views and the constexprs all kernels take, for a new key
        arrays = dict(zip(SAVED + TEMP, views(ws, saved, SAVED) + views(tmp, layout, TEMP), strict=True))
        return arrays, dict(H=H, K=K, V=V, BT=BT, L2NORM=l2norm, PREC=_prec(q))

    # the sequential kernel first: at small batches the GPU waits for this launch
    ph = placeholder(dev)
    dh0 = torch.empty(B, H, K, V, device=dev, dtype=torch.float32) if need_dh0 else None
    dht_t, dh0_t = (dht if dht is not None else ph), (dh0 if need_dh0 else ph)
    ptrs = (q_ptr, k_ptr, G, Pm, Wk, Rn, do_ptr, dht_t.data_ptr(), dhs, dW, dh0_t.data_ptr())

    def first():
        x, meta = typed()
        meta.update(BK=pow2(K), BV=pick_bv(V), USE_DHT=dht is not None, STORE_DH0=need_dh0,
                    num_warps=CONFIG["state_warps"], num_stages=num_stages("state", q))  # fmt: skip
        args = (q, k, x["G"], x["Pm"], x["Wk"], x["Rn"], do, dht_t, x["dhs"], x["dW"], dh0_t, scale, T)
        return (cdiv(V, meta["BV"]), B * H), args, meta

    launch_keyed(_bwd_state_kernel, ("bwd_state", *facts), first, ptrs, (scale, T))

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dg, dbeta = torch.empty_like(g), torch.empty_like(beta)
    o = o if l2norm else ph  # read for (9) only
    ptrs = (q_ptr, k_ptr, G, hs, dhs, W, do_ptr, o.data_ptr(), Rn, dq.data_ptr(), dk_o, dG_o)

    def first():
        x, meta = typed()
        meta.update(BKH=_bkh(K), BV=pick_bv_chunk("out", V), num_warps=CONFIG["chunk_warps"],
                    num_stages=num_stages("out", q))  # fmt: skip
        args = (q, k, x["G"], x["hs"], x["dhs"], x["W"], do, o, x["Rn"], dq, x["dk_o"], x["dG_o"], scale, T)
        # a chunk's K slices adjacent in the grid: they read the same dO, W (and O) tiles, all but the first from L2
        return (cdiv(T, BT) * cdiv(K, _bkh(K)), B * H), args, meta

    launch_keyed(_bwd_out_kernel, ("bwd_out", *facts), first, ptrs, (scale, T))
    ptrs = (k_ptr, v.data_ptr(), beta.data_ptr(), G, Tinv, hs, dW, dk_o, dG_o, Rn,
            dk.data_ptr(), dv.data_ptr(), dg.data_ptr(), dbeta.data_ptr())  # fmt: skip

    def first():
        x, meta = typed()
        meta.update(BK=pow2(K), BKH=_bkh(K), BV=pick_bv_chunk("wy", V), num_warps=CONFIG["chunk_warps"],
                    num_stages=num_stages("wy", q))  # fmt: skip
        args = (k, v, beta, x["G"], x["Tinv"], x["hs"], x["dW"], x["dk_o"], x["dG_o"], x["Rn"], dk, dv, dg, dbeta, T)
        return (cdiv(T, BT), B * H), args, meta

    launch_keyed(_bwd_wy_kernel, ("bwd_wy", *facts), first, ptrs, (T,))
    return dq, dk, dv, dg, dbeta, dh0


def _bkh(K: int) -> int:
    """Key columns per `_bwd_out_kernel` program."""
    return min(pow2(K), 64)


TEMP = ("dhs", "dW", "dk_o", "dG_o")  # the backward's workspace, `_temp_layout`


@functools.lru_cache(maxsize=256)
def _temp_layout(B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype) -> tuple:
    """The backward's temporaries in one workspace (`carve`), and their offsets in TEMP's order: dS' per chunk
    and dW (as the states and W), `_bwd_out_kernel`'s part of dk (input dtype: half the bytes of its round
    trip) and its parts of dG (fp32, one per 64 key columns)."""
    NT = cdiv(T, BT)
    Tp, BH = NT * BT, B * H
    parts = [("dhs", dtype, (BH, NT, K, V)), ("dW", dtype, (BH, Tp, V)), ("dk_o", dtype, (BH, Tp, K)),
             ("dG_o", torch.float32, (cdiv(K, _bkh(K)), BH, Tp))]  # fmt: skip
    return carve_named(parts, TEMP)
