"""Fused Triton kernels for compressed sparse attention (CSA): forward and backward.

Layout and math as in `reference.py` (equations (1)-(3) there). GQA through the index: K/V are never
repeated in memory. The forward and the dq kernel pack the G = H / Hkv query heads of KV head hk as rows:
packed row r = G t + g is token t of query head hk G + g, so a program's BLOCK_M rows span BLOCK_M / G
tokens of all G heads and each K/V tile it loads serves all of them. One forward program owns BLOCK_M
packed rows and runs two online softmaxes with separate normalizers:

    comp  : compressed keys j with t >= stride (j + 1); blocks below t0 // stride need no mask (t0: the
            block's first token)
    local : raw keys s with t - window + 1 <= s <= t: t0 - window + 1 .. t1 (t1: the block's last token),
            BLOCK_M / G + window - 1 keys, so the window band wastes less the more heads share a tile
    o     = local + blend * (comp - local)                                                     (3)

Nothing of size T x T or T x T/stride exists; the forward saves dcl = comp - local and the two log2-sum-exps
(in one buffer: `_saved_layout`).
Every tensor is contiguous, so the kernels take no strides: row offsets come from T and the constexpr
head counts and head dim. The forward and dq programs of one (batch, KV head) start one after the other,
costliest row block first (`_row_block`): the programs in flight together then read the K/V tiles of a
few heads and span every loop length (at B 64 on an H100: dq 395 -> 313 us, forward 248 -> 239, against
starting row block n - 1 of every head, then n - 2, ...; profiles/csa.md).

Backward (two launches):
    _bwd_dq  : per block of packed rows. comp = o + (1 - blend) dcl and local = o - blend dcl (from (3)),
               dblend = do * dcl, dC = blend do, dL = (1 - blend) do,
               delta_x = rowsum(dX * x) (the softmax backward's D term), then
               dq = scale (dS_c Kc + dS_l K) with dS = P * (dP - delta), dP = dX V^T.
               Stores dblend, dC and dL ([B, T, H, 2, D]) and the deltas ([B, H, 2, T]) for the next launch.
    _bwd_dkv : per key block of one KV head, raw or compressed: loops over the G query heads and the
               query blocks that see it; dV = P^T dX, dK = scale dS^T Q. No atomics: deterministic.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from kernels.common import addresses, bound_kernel, carve, carve_named, cdiv, fast_apply, launch_keyed, views
from kernels.csa import node

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = math.log2(math.e)

# Masks inside one tile: none (all keys visible to all rows), compressed visibility, causal window.
NO_MASK, COMP_MASK, WINDOW_MASK = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _visible(t, s, MASK: tl.constexpr, STRIDE: tl.constexpr, WINDOW: tl.constexpr):
    """Visibility of key s to query t (index tensors broadcast to the tile, either orientation)."""
    if MASK == COMP_MASK:
        return t >= STRIDE * (s + 1)
    return (t - s).to(tl.uint32) < WINDOW  # t - WINDOW < s <= t in one unsigned compare


@triton.jit
def _unpack(offs_r, G: tl.constexpr, H: tl.constexpr):
    """Packed rows r = G t + g -> token t, head g within the KV group, and r + t (H - G) = t H + g: the
    row's index in a [T, H] plane counted from the group's first head."""
    t = offs_r // G
    return t, offs_r - t * G, offs_r + t * (H - G)


@triton.jit
def _packed_rows(H: tl.constexpr, HKV: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's block of packed rows (forward and dq kernels): batch b (int64), KV head hk, each row's
    token t, head g within the group and t H + g (`_unpack`), and the block's first and last token."""
    G: tl.constexpr = H // HKV
    pid_bk, row_block = _row_block()
    r0 = row_block * BLOCK_M
    b64 = (pid_bk // HKV).to(tl.int64)
    hk = pid_bk % HKV
    t, g, th = _unpack(r0 + tl.arange(0, BLOCK_M), G, H)
    return b64, hk, t, g, th, r0 // G, (r0 + BLOCK_M - 1) // G


@triton.jit
def _row_block():
    """(batch x KV head, row block) of this program in a grid (B Hkv, row blocks): the linear program id
    (axis 0 fastest, the hardware's launch order) runs over the row blocks of one (b, hk), from the last
    (the longest loops) down, then over the next (b, hk)."""
    n_blocks = tl.num_programs(1)
    lin = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    return lin // n_blocks, n_blocks - 1 - lin % n_blocks


@triton.jit
def _fwd_path(
    acc, l_i, m_i, q, K, V, stride_kt, stride_vt, n_keys, t, offs_d, lo, hi, qk_scale,
    MASK: tl.constexpr, STRIDE: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online softmax of q (rows of tokens t) against keys [lo, hi) of one path; scores in log2 units."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_kv = offs_n[:, None] < n_keys
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=in_kv, other=0.0)
        s = tl.dot(q, tl.trans(k))
        if MASK != NO_MASK:
            s = tl.where(_visible(t[:, None], offs_n[None, :], MASK, STRIDE, WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_kv, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _csa_fwd(
    Q, K, V, KC, VC, BLEND, O, DCL, LSE, T, Tc, qk_scale,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, STRIDE: tl.constexpr, WINDOW: tl.constexpr,
    SAVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NL: tl.constexpr,
):
    G = H // HKV
    b64, hk, t, g, th, t0, t1 = _packed_rows(H, HKV, BLOCK_M)  # t0, t1: first and last token of the block
    offs_d = tl.arange(0, D)
    in_t = t < T
    row_offs = (b64 * T * H + hk * G + th[:, None]) * D + offs_d[None, :]  # q, o, dcl, blend rows
    q = tl.load(Q + row_offs, mask=in_t[:, None], other=0.0)

    # (1) compressed path: blocks j < t0 // STRIDE are visible to every row of the tile, the rest up to
    # the last row's limit (t1 // STRIDE) get the visibility mask.
    KCb, VCb = KC + (b64 * Tc * HKV + hk) * D, VC + (b64 * Tc * HKV + hk) * D
    acc_c = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_c = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_c = tl.full([BLOCK_M], -1e30, dtype=tl.float32)  # finite: fully masked tiles give alpha = 1, not NaN
    mid_c = (t0 // STRIDE) // BLOCK_N * BLOCK_N
    hi_c = tl.minimum(t1 // STRIDE, Tc)
    acc_c, l_c, m_c = _fwd_path(acc_c, l_c, m_c, q, KCb, VCb, HKV * D, HKV * D, Tc, t, offs_d, 0, mid_c,
                                qk_scale, NO_MASK, STRIDE, WINDOW, BLOCK_N)
    acc_c, l_c, m_c = _fwd_path(acc_c, l_c, m_c, q, KCb, VCb, HKV * D, HKV * D, Tc, t, offs_d, mid_c, hi_c,
                                qk_scale, COMP_MASK, STRIDE, WINDOW, BLOCK_N)
    # (2) local path: keys t0 - WINDOW + 1 .. t1 in tiles of BLOCK_NL from the first one (unaligned), all
    # masked.
    Kb, Vb = K + (b64 * T * HKV + hk) * D, V + (b64 * T * HKV + hk) * D
    acc_l = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_l = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    lo_l = tl.maximum(t0 - WINDOW + 1, 0)
    hi_l = tl.minimum(t1 + 1, T)
    acc_l, l_l, m_l = _fwd_path(acc_l, l_l, m_l, q, Kb, Vb, HKV * D, HKV * D, T, t, offs_d, lo_l, hi_l,
                                qk_scale, WINDOW_MASK, STRIDE, WINDOW, BLOCK_NL)

    has_c = l_c > 0  # rows t < STRIDE see no compressed block: comp = 0 by definition
    comp = acc_c / tl.where(has_c, l_c, 1.0)[:, None]
    local = acc_l / tl.where(in_t, l_l, 1.0)[:, None]  # l_l >= 1 on real rows (the diagonal)
    blend = tl.load(BLEND + row_offs, mask=in_t[:, None], other=0.0).to(tl.float32)
    tl.store(O + row_offs, (local + blend * (comp - local)).to(O.dtype.element_ty), mask=in_t[:, None])
    if SAVE:
        tl.store(DCL + row_offs, (comp - local).to(DCL.dtype.element_ty), mask=in_t[:, None])
        lse_offs = (b64 * H + hk * G + g) * 2 * T + t  # LSE [B, H, 2, T]: compressed path, then local path
        lse_c = tl.where(has_c, m_c + tl.log2(tl.where(has_c, l_c, 1.0)), float("inf"))
        tl.store(LSE + lse_offs, lse_c, mask=in_t)
        tl.store(LSE + T + lse_offs, m_l + tl.log2(tl.where(in_t, l_l, 1.0)), mask=in_t)


@triton.jit
def _bwd_dq_path(
    dq, q, do, lse, delta, K, V, stride_kt, stride_vt, n_keys, t, offs_d, lo, hi, qk_scale,
    MASK: tl.constexpr, STRIDE: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq += dS K over keys [lo, hi) of one path, dS = P * (dO V^T - delta) (unscaled)."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_kv = offs_n[:, None] < n_keys
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=in_kv, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_kv, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASK != NO_MASK:
            p = tl.where(_visible(t[:, None], offs_n[None, :], MASK, STRIDE, WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _csa_bwd_dq(
    Q, K, V, KC, VC, BLEND, O, DCL, DO, LSE, DQ, DBLEND, DX, DELTA, T, Tc, qk_scale, scale,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, STRIDE: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NL: tl.constexpr,
):
    G = H // HKV
    b64, hk, t, g, th, t0, t1 = _packed_rows(H, HKV, BLOCK_M)  # t0, t1: first and last token of the block
    offs_d = tl.arange(0, D)
    in_t = t < T
    row = in_t[:, None]
    bth = b64 * T * H + hk * G + th[:, None]  # rows of every [B, T, H, .] tensor
    offs = bth * D + offs_d[None, :]
    q = tl.load(Q + offs, mask=row, other=0.0)
    do = tl.load(DO + offs, mask=row, other=0.0).to(tl.float32)
    o = tl.load(O + offs, mask=row, other=0.0).to(tl.float32)
    dcl = tl.load(DCL + offs, mask=row, other=0.0).to(tl.float32)
    blend = tl.load(BLEND + offs, mask=row, other=0.0).to(tl.float32)

    # Split the gradient over the blend (3) and form each path's softmax-backward delta.
    tl.store(DBLEND + offs, (do * dcl).to(DBLEND.dtype.element_ty), mask=row)
    dc = blend * do
    dl = do - dc
    delta_c = tl.sum(dc * (o + (1.0 - blend) * dcl), 1)
    delta_l = tl.sum(dl * (o - blend * dcl), 1)
    dc, dl = dc.to(Q.dtype.element_ty), dl.to(Q.dtype.element_ty)
    dx_offs = bth * 2 * D + offs_d[None, :]  # DX [B, T, H, 2, D]
    tl.store(DX + dx_offs, dc, mask=row)
    tl.store(DX + D + dx_offs, dl, mask=row)
    lse_offs = (b64 * H + hk * G + g) * 2 * T + t  # DELTA and LSE [B, H, 2, T]
    tl.store(DELTA + lse_offs, delta_c, mask=in_t)
    tl.store(DELTA + T + lse_offs, delta_l, mask=in_t)
    lse_c = tl.load(LSE + lse_offs, mask=in_t, other=float("inf"))
    lse_l = tl.load(LSE + T + lse_offs, mask=in_t, other=float("inf"))

    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    KCb, VCb = KC + (b64 * Tc * HKV + hk) * D, VC + (b64 * Tc * HKV + hk) * D
    mid_c = (t0 // STRIDE) // BLOCK_N * BLOCK_N
    hi_c = tl.minimum(t1 // STRIDE, Tc)
    dq = _bwd_dq_path(dq, q, dc, lse_c, delta_c, KCb, VCb, HKV * D, HKV * D, Tc, t, offs_d, 0, mid_c,
                      qk_scale, NO_MASK, STRIDE, WINDOW, BLOCK_N)
    dq = _bwd_dq_path(dq, q, dc, lse_c, delta_c, KCb, VCb, HKV * D, HKV * D, Tc, t, offs_d, mid_c, hi_c,
                      qk_scale, COMP_MASK, STRIDE, WINDOW, BLOCK_N)
    Kb, Vb = K + (b64 * T * HKV + hk) * D, V + (b64 * T * HKV + hk) * D
    lo_l = tl.maximum(t0 - WINDOW + 1, 0)
    hi_l = tl.minimum(t1 + 1, T)
    dq = _bwd_dq_path(dq, q, dl, lse_l, delta_l, Kb, Vb, HKV * D, HKV * D, T, t, offs_d, lo_l, hi_l,
                      qk_scale, WINDOW_MASK, STRIDE, WINDOW, BLOCK_NL)
    tl.store(DQ + offs, (dq * scale).to(DQ.dtype.element_ty), mask=row)


@triton.jit
def _bwd_dkv_path(
    dk, dv, k, v, Q, DX, LSE, DELTA, T, offs_n, offs_d, lo, hi, qk_scale,
    MASK: tl.constexpr, H: tl.constexpr, D: tl.constexpr, STRIDE: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dv += P^T dX, dk += dS^T Q over query rows [lo, hi) of one head (transposed tiles [keys, rows]).

    Q points at the head's row 0 of [., T, H, D]; DX at the path's half of [., T, H, 2, D]; LSE, DELTA at
    the head's [T] row of the path. Rows >= T load lse = inf: P is 0.
    """
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        in_t = offs_m < T
        q = tl.load(Q + offs_m[:, None] * (H * D) + offs_d[None, :], mask=in_t[:, None], other=0.0)
        dx = tl.load(DX + offs_m[:, None] * (2 * H * D) + offs_d[None, :], mask=in_t[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=in_t, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=in_t, other=0.0)
        pt = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        if MASK != NO_MASK:
            pt = tl.where(_visible(offs_m[None, :], offs_n[:, None], MASK, STRIDE, WINDOW), pt, 0.0)
        dv += tl.dot(pt.to(dx.dtype), dx)
        dst = pt * (tl.dot(v, tl.trans(dx)) - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q)
    return dk, dv


@triton.jit
def _dkv_block(
    Q, KX, VX, DX, LSE, DELTA, DKX, DVX, b64, hk, n0, n_keys, T, qk_scale, scale,
    COMP: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    STRIDE: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of keys [n0, n0 + BLOCK_N) of KV head hk, summed over its G query heads.

    COMP: compressed keys j (row t sees j iff t >= STRIDE (j + 1): rows from STRIDE (n0 + 1) see part of
    the block, rows from STRIDE (n0 + BLOCK_N) all of it) against dC, else raw keys s (rows s .. s +
    WINDOW - 1 see them, all tiles masked) against dL.
    """
    G = H // HKV
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    in_kv = offs_n[:, None] < n_keys
    kv_offs = ((b64 * n_keys + offs_n[:, None]) * HKV + hk) * D + offs_d[None, :]  # contiguous [B, ., HKV, D]
    k = tl.load(KX + kv_offs, mask=in_kv, other=0.0)
    v = tl.load(VX + kv_offs, mask=in_kv, other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    half = 0 if COMP else 1  # the path's half of DX [B, T, H, 2, D] and of LSE, DELTA [B, H, 2, T]
    for h in range(hk * G, hk * G + G):
        Qh, DXh = Q + b64 * T * H * D + h * D, DX + b64 * T * H * 2 * D + (h * 2 + half) * D
        LSEh, DELTAh = LSE + ((b64 * H + h) * 2 + half) * T, DELTA + ((b64 * H + h) * 2 + half) * T
        if COMP:
            lo = STRIDE * (n0 + 1)  # rows [lo, mid) need the visibility mask, rows [mid, T) see every key
            mid = tl.minimum(lo + tl.cdiv(STRIDE * (BLOCK_N - 1), BLOCK_M) * BLOCK_M, T)
            dk, dv = _bwd_dkv_path(dk, dv, k, v, Qh, DXh, LSEh, DELTAh, T, offs_n, offs_d, lo, mid,
                                   qk_scale, COMP_MASK, H, D, STRIDE, WINDOW, BLOCK_M)
            dk, dv = _bwd_dkv_path(dk, dv, k, v, Qh, DXh, LSEh, DELTAh, T, offs_n, offs_d, mid, T,
                                   qk_scale, NO_MASK, H, D, STRIDE, WINDOW, BLOCK_M)
        else:
            hi = tl.minimum(n0 + BLOCK_N + WINDOW - 1, T)
            dk, dv = _bwd_dkv_path(dk, dv, k, v, Qh, DXh, LSEh, DELTAh, T, offs_n, offs_d, n0, hi,
                                   qk_scale, WINDOW_MASK, H, D, STRIDE, WINDOW, BLOCK_M)
    tl.store(DKX + kv_offs, (dk * scale).to(DKX.dtype.element_ty), mask=in_kv)
    tl.store(DVX + kv_offs, dv.to(DVX.dtype.element_ty), mask=in_kv)


@triton.jit
def _csa_bwd_dkv(
    Q, KC, VC, K, V, DX, LSE, DELTA, DKC, DVC, DK, DV, T, Tc, qk_scale, scale,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, STRIDE: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_MR: tl.constexpr, BLOCK_NR: tl.constexpr,
):
    """Compressed key blocks of BLOCK_N (rows in tiles of BLOCK_M), then raw key blocks of BLOCK_NR (rows
    in tiles of BLOCK_MR). Grid (B Hkv, blocks): the compressed block 0 of every head (the longest row
    loops) starts first."""
    pid_bh = tl.program_id(0)
    pid = tl.program_id(1)
    b64 = (pid_bh // HKV).to(tl.int64)
    hk = pid_bh % HKV
    n_comp_blocks = tl.cdiv(Tc, BLOCK_N)
    if pid < n_comp_blocks:
        _dkv_block(Q, KC, VC, DX, LSE, DELTA, DKC, DVC, b64, hk, pid * BLOCK_N, Tc, T, qk_scale, scale, True, H,
                   HKV, D, STRIDE, WINDOW, BLOCK_M, BLOCK_N)
    else:
        _dkv_block(Q, K, V, DX, LSE, DELTA, DK, DV, b64, hk, (pid - n_comp_blocks) * BLOCK_NR, T, T, qk_scale,
                   scale, False, H, HKV, D, STRIDE, WINDOW, BLOCK_MR, BLOCK_NR)


# Tile shapes and launch settings per kernel: the fastest correct ones of bench/csa.py's sweep on an H100
# (sum of the B 16 and B 64 times at T 1024, H 9, Hkv 3, D 64; profiles/csa.json "sweep"; the forward's
# BLOCK_N of 64 from session 5's A/B, BLOCK_NL of 32 with packed rows from session 6's, profiles/csa.md:
# 64 packed rows span 22 tokens, whose window of 85 keys takes 3 tiles of 32). BLOCK_N tiles compressed
# keys, BLOCK_NL the window's raw keys, BLOCK_NR raw key blocks in _csa_bwd_dkv; BLOCK_M tiles packed rows
# in the forward and _csa_bwd_dq, one head's query rows (as BLOCK_MR) in _csa_bwd_dkv. maxnreg caps
# registers per thread: at 168 three 4-warp programs fit on an SM instead of two (the forward needs 183
# uncapped and then runs 20% slower; the key-block kernel spills a little at 168 and still gains at B 64).
CONFIG = {
    "fwd": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_NL=32, num_warps=4, num_stages=3, maxnreg=168),
    "bwd_dq": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_NL=32, num_warps=4, num_stages=3),
    "bwd_dkv": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_MR=32, BLOCK_NR=64, num_warps=4, num_stages=3, maxnreg=168),
}


def csa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
    blend: torch.Tensor, window: int, stride: int, scale: float, save: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward on contiguous inputs (k, v, kc, vc in q's dtype); returns o [B, T, H, D] and, when
    `save`, the bytes the backward reads (`_saved_layout`: dcl = comp - local, then the two log2-sum-exps),
    else None. One buffer for both: an allocation costs microseconds of the host time a small step is made of."""
    B, T, H, D = q.shape
    Hkv, Tc = k.shape[2], kc.shape[1]
    o = torch.empty_like(q)
    size, saved, offsets = _saved_layout(B, T, H, D, q.dtype)
    ws = torch.empty(size, dtype=torch.uint8, device=q.device) if save else None
    o_ptr = o.data_ptr()
    # without `save` the kernel touches neither DCL nor LSE: o's address stands in for both
    dcl_ptr, lse_ptr = addresses(ws, offsets) if save else (o_ptr, o_ptr)
    cfg = CONFIG["fwd"]

    def first():  # the launch with tensors, for Triton's front end (a new key, CPU tensors)
        dcl, lse = views(ws, saved, SAVED) if save else (o, o)
        grid = (B * Hkv, cdiv(T * H // Hkv, cfg["BLOCK_M"]), 1)
        meta = dict(H=H, HKV=Hkv, D=D, STRIDE=stride, WINDOW=window, SAVE=save, **cfg)
        return grid, (q, k, v, kc, vc, blend, o, dcl, lse, T, Tc, scale * LOG2E), meta

    ptrs = (*map(torch.Tensor.data_ptr, (q, k, v, kc, vc, blend)), o_ptr, dcl_ptr, lse_ptr)
    launch_keyed(_csa_fwd, _key("fwd", save, *_facts(q, k, v, kc, vc, blend, window, stride)), first, ptrs,
                 (T, Tc, scale * LOG2E))
    return o, ws


def csa_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
    blend: torch.Tensor, o: torch.Tensor, ws: torch.Tensor, window: int, stride: int, scale: float,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward (inputs as `csa_fwd` took them, its o and saved bytes `ws`; `do` any layout);
    returns dq, dk, dv, dkc, dvc, dblend (contiguous, in the inputs' dtypes)."""
    do = do.contiguous()
    B, T, H, D = q.shape
    Hkv, Tc = k.shape[2], kc.shape[1]
    cfg_dq, cfg_dkv = CONFIG["bwd_dq"], CONFIG["bwd_dkv"]
    key_dq, key_dkv = _bwd_keys(_facts(q, k, v, kc, vc, blend, window, stride), do.dtype)
    dq, dblend = torch.empty_like(q), torch.empty_like(blend)
    _, saved, offsets = _saved_layout(B, T, H, D, q.dtype)
    size, temp, tmp_offsets = _temp_layout(B, T, H, D, q.dtype)
    tmp = torch.empty(size, dtype=torch.uint8, device=q.device)
    dcl_ptr, lse_ptr = addresses(ws, offsets)
    dx_ptr, delta_ptr = addresses(tmp, tmp_offsets)
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr = map(torch.Tensor.data_ptr, (q, k, v, kc, vc))
    scalars = (T, Tc, scale * LOG2E, scale)

    def first():
        (dcl, lse), (dx, delta) = views(ws, saved, SAVED), views(tmp, temp, TEMP)
        grid = (B * Hkv, cdiv(T * H // Hkv, cfg_dq["BLOCK_M"]), 1)
        meta = dict(H=H, HKV=Hkv, D=D, STRIDE=stride, WINDOW=window, **cfg_dq)
        return grid, (q, k, v, kc, vc, blend, o, dcl, do, lse, dq, dblend, dx, delta, *scalars), meta

    ptrs = (q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, blend.data_ptr(), o.data_ptr(), dcl_ptr, do.data_ptr(), lse_ptr,
            dq.data_ptr(), dblend.data_ptr(), dx_ptr, delta_ptr)
    launch_keyed(_csa_bwd_dq, key_dq, first, ptrs, scalars)
    dk, dv, dkc, dvc = torch.empty_like(k), torch.empty_like(v), torch.empty_like(kc), torch.empty_like(vc)

    def first():
        (_, lse), (dx, delta) = views(ws, saved, SAVED), views(tmp, temp, TEMP)
        grid = (B * Hkv, cdiv(Tc, cfg_dkv["BLOCK_N"]) + cdiv(T, cfg_dkv["BLOCK_NR"]), 1)  # compressed, then raw
        meta = dict(H=H, HKV=Hkv, D=D, STRIDE=stride, WINDOW=window, **cfg_dkv)
        return grid, (q, kc, vc, k, v, dx, lse, delta, dkc, dvc, dk, dv, *scalars), meta

    ptrs = (q_ptr, kc_ptr, vc_ptr, k_ptr, v_ptr, dx_ptr, lse_ptr, delta_ptr,
            *map(torch.Tensor.data_ptr, (dkc, dvc, dk, dv)))
    launch_keyed(_csa_bwd_dkv, key_dkv, first, ptrs, scalars)
    return dq, dk, dv, dkc, dvc, dblend


SAVED, TEMP = ("dcl", "lse"), ("dx", "delta")  # the forward's saved workspace, the backward's temporaries


def _saved_parts(B: int, T: int, H: int, D: int, dtype: torch.dtype) -> list:
    """The forward's saved arrays for `carve`: dcl [B, T, H, D] (q's dtype), then the two log2-sum-exps
    [B, H, 2, T] (fp32; compressed path first, +inf for rows without a visible compressed block)."""
    return [("dcl", dtype, (B, T, H, D)), ("lse", torch.float32, (B, H, 2, T))]


@functools.lru_cache(maxsize=256)
def _saved_layout(B: int, T: int, H: int, D: int, dtype: torch.dtype) -> tuple:
    """`carve(_saved_parts(...))` and the offsets of SAVED, per shape."""
    return carve_named(_saved_parts(B, T, H, D, dtype), SAVED)


@functools.lru_cache(maxsize=256)
def _temp_layout(B: int, T: int, H: int, D: int, dtype: torch.dtype) -> tuple:
    """The backward's temporaries (`carve`) and their offsets in TEMP's order: dX [B, T, H, 2, D] (dC = blend dO,
    dL = dO - dC, for the key-block launch), then delta [B, H, 2, T] (fp32)."""
    return carve_named([("dx", dtype, (B, T, H, 2, D)), ("delta", torch.float32, (B, H, 2, T))], TEMP)


def _key(stage: str, *facts) -> tuple:
    """`launch_keyed`'s key of a launch: the stage (a CONFIG entry), the facts of the call, the stage's CONFIG."""
    return (stage, *facts, *CONFIG[stage].items())


def _bwd_keys(facts: tuple, do_dtype: torch.dtype) -> tuple:
    """The keys of the backward's two launches (dq, then dk/dv) for the forward's facts and dO's dtype."""
    return _key("bwd_dq", *facts, do_dtype), _key("bwd_dkv", *facts, do_dtype)


def _facts(q, k, v, kc, vc, blend, window: int, stride: int) -> tuple:
    """What fixes a launch's specialization besides CONFIG (`kernels.common.launch_keyed`): device, shapes
    (grids, constexprs, the integers T and Tc), dtypes and options. o, dcl and the backward's outputs take
    the inputs' dtypes; LSE and delta are fp32."""
    return (q.device, q.shape, k.shape[2], kc.shape[1], q.dtype, k.dtype, v.dtype, kc.dtype, vc.dtype, blend.dtype,
            window, stride)


# torch.library ops: opaque to torch.compile (fullgraph works), differentiable through register_autograd.
@torch.library.custom_op("hyla::csa_fwd", mutates_args=())
def _csa_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
    blend: torch.Tensor, window: int, stride: int, scale: float, save: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    o, ws = csa_fwd(q, k, v, kc, vc, blend, window, stride, scale, save)
    return o, q.new_empty(0, dtype=torch.uint8) if ws is None else ws


@_csa_fwd_op.register_fake
def _(q, k, v, kc, vc, blend, window, stride, scale, save):
    size = carve(_saved_parts(*q.shape, q.dtype))[0] if save else 0  # (not the cached layout: symbolic sizes)
    return torch.empty_like(q), q.new_empty(size, dtype=torch.uint8)


@torch.library.custom_op("hyla::csa_bwd", mutates_args=())
def _csa_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
    blend: torch.Tensor, o: torch.Tensor, ws: torch.Tensor, window: int, stride: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return csa_bwd(do, q, k, v, kc, vc, blend, o, ws, window, stride, scale)


@_csa_bwd_op.register_fake
def _(do, q, k, v, kc, vc, blend, o, ws, window, stride, scale):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(kc),
            torch.empty_like(vc), torch.empty_like(blend))


def _setup_context(ctx, inputs, output):
    q, k, v, kc, vc, blend, ctx.window, ctx.stride, ctx.scale, save = inputs
    ctx.save_for_backward(q, k, v, kc, vc, blend, *output)


def _backward(ctx, do, *unused):
    grads = _csa_bwd_op(do, *ctx.saved_tensors, ctx.window, ctx.stride, ctx.scale)
    return (*grads, None, None, None, None)


_csa_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def check_inputs(q: torch.Tensor, *others: torch.Tensor) -> None:
    """What the kernels need beyond `csa_attention`'s shape checks: head dim and dtypes (ValueError)."""
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"triton backend supports head dims {SUPPORTED_HEAD_DIMS}, got {D}")
    for x in (q, *others):
        if x.dtype not in SUPPORTED_DTYPES:
            supported = [str(d) for d in SUPPORTED_DTYPES]
            raise ValueError(f"triton backend supports dtypes {supported}, got {x.dtype}")


class _CSAFunction(torch.autograd.Function):
    """Eager autograd path in Python: the same launches as the custom ops, without their Python dispatch cost
    (tens of microseconds per call, which is most of the kernels' time at small batch). The C++ node
    (`node`) launches the same kernels with no Python at all, once they are bound."""

    @staticmethod
    def forward(ctx, q, k, v, kc, vc, blend, window, stride, scale):
        o, ws = csa_fwd(q, k, v, kc, vc, blend, window, stride, scale, True)
        ctx.save_for_backward(q, k, v, kc, vc, blend, o, ws)
        ctx.args = window, stride, scale
        return o

    @staticmethod
    def backward(ctx, do):
        return (*csa_bwd(do, *ctx.saved_tensors, *ctx.args), None, None, None)


def csa_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
    blend: torch.Tensor, window: int, stride: int, scale: float,
) -> torch.Tensor:
    """The fused kernel pair behind `kernels.csa.csa_attention(..., backend="triton")` (inputs checked there).

    Inputs are made contiguous and k, v, kc, vc cast to q's dtype (one dtype for the matrix units); both
    are no-ops for the model's tensors. Saves dcl and the log-sum-exps for the backward only when some
    input needs a gradient. Under torch.compile it goes through the torch.library ops (hyla::csa_fwd /
    hyla::csa_bwd); in eager through the C++ autograd node (`node`) once this set of shapes has a plan,
    else (its first call, the CPU interpreter, functorch transforms) through an autograd.Function.
    """
    dt = q.dtype
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or not {dt, k.dtype, v.dtype, kc.dtype, vc.dtype, blend.dtype} <= _DTYPES:
        check_inputs(q, k, v, kc, vc, blend)  # raises the precise ValueError
    if not k.dtype == v.dtype == kc.dtype == vc.dtype == dt:  # (a .to() that does nothing still costs)
        k, v, kc, vc = k.to(dt), v.to(dt), kc.to(dt), vc.to(dt)
    q, k, v, blend = q.contiguous(), k.contiguous(), v.contiguous(), blend.contiguous()
    kc, vc = kc.contiguous(), vc.contiguous()
    save = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or kc.requires_grad or vc.requires_grad
        or blend.requires_grad
    )
    if torch.compiler.is_compiling():  # opaque ops in the graph
        return _csa_fwd_op(q, k, v, kc, vc, blend, window, stride, scale, save)[0]
    if not save:
        return csa_fwd(q, k, v, kc, vc, blend, window, stride, scale, False)[0]
    if node.ENABLED and q.is_cuda and not torch._C._are_functorch_transforms_active():
        o = _node_apply(q, k, v, kc, vc, blend, window, stride, scale)
        if o is not None:
            return o
    return _APPLY(q, k, v, kc, vc, blend, window, stride, scale)


def _node_apply(q, k, v, kc, vc, blend, window: int, stride: int, scale: float) -> torch.Tensor | None:
    """o through the C++ autograd node, or None for the Python path: no plan for these facts (yet), or an
    input address that is not 16-byte aligned (the bound kernels are specialized on aligned ones)."""
    facts = _facts(q, k, v, kc, vc, blend, window, stride)
    plan = _PLANS.get((facts, scale))
    if plan is None:
        plan = _node_plan(facts, q, kc, scale)
        if plan is not None:
            _PLANS[facts, scale] = plan
    if not plan or (q.data_ptr() | k.data_ptr() | v.data_ptr() | kc.data_ptr() | vc.data_ptr() | blend.data_ptr()) & 15:
        return None
    apply, p = plan
    return apply(q, k, v, kc, vc, blend, p)


def _node_plan(facts: tuple, q: torch.Tensor, kc: torch.Tensor, scale: float):
    """(apply, plan) of the C++ autograd node (`node`) for one set of facts and scale: the kernels the Python
    path bound and the layouts of its buffers. None while a kernel is still unbound (no call of these facts has
    run its backward yet); False if the node cannot serve them (it did not build, or a kernel needs more than a
    plain launch)."""
    ext = node.extension()
    if ext is None:
        return False
    keys = (_key("fwd", True, *facts), *_bwd_keys(facts, q.dtype))  # the node casts dO to q's dtype
    kernels = [bound_kernel(f, key, n) for f, key, n in zip(_KERNELS, keys, ext.ARG_COUNTS, strict=True)]
    if None in kernels:
        return None
    if False in kernels:
        return False
    B, T, H, D = q.shape
    saved, temp = _saved_layout(B, T, H, D, q.dtype), _temp_layout(B, T, H, D, q.dtype)
    plan = ext.make_plan(*kernels, T, kc.shape[1], scale * LOG2E, scale, (saved[0], *saved[2]), (temp[0], *temp[2]))
    return ext.apply, plan


_KERNELS = (_csa_fwd, _csa_bwd_dq, _csa_bwd_dkv)  # the node's launches, in its ARG_COUNTS order
_DTYPES = set(SUPPORTED_DTYPES)
_APPLY = fast_apply(_CSAFunction)
_PLANS: dict = {}  # (facts, scale) -> (apply, plan) of the C++ node, or False
