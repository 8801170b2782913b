"""Fused Triton kernels for compressed sparse attention (CSA): forward and backward.

Layout and math as in `reference.py` (equations (1)-(3) there). One forward program owns BLOCK_M query
rows of one query head and runs two online softmaxes with separate normalizers:

    comp  : compressed keys j with t >= stride (j + 1); blocks below m0 // stride need no mask
    local : raw keys s with t - window + 1 <= s <= t (the key blocks around the query block)
    o     = local + blend * (comp - local)                                                     (3)

Query head h reads KV head h // G (GQA through the index; K/V are never repeated in memory). Nothing of
size T x T or T x T/stride exists; the forward saves the two log2-sum-exps and dcl = comp - local.

Backward (two launches):
    _bwd_dq  : per query block. comp = o + (1 - blend) dcl and local = o - blend dcl (from (3)),
               dblend = do * dcl, dC = blend do, dL = (1 - blend) do,
               delta_x = rowsum(dX * x) (the softmax backward's D term), then
               dq = scale (dS_c Kc + dS_l K) with dS = P * (dP - delta), dP = dX V^T.
               Stores dblend, dC, dL and the deltas for the next launch.
    _bwd_dkv : per key block of one KV head, raw or compressed: loops over the G query heads and the
               query blocks that see it; dV = P^T dX, dK = scale dS^T Q. No atomics: deterministic.
"""

import math

import torch
import triton
import triton.language as tl

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
def _fwd_path(
    acc, l_i, m_i, q, K, V, stride_kt, stride_vt, n_keys, offs_m, offs_d, lo, hi, qk_scale,
    MASK: tl.constexpr, STRIDE: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online softmax of q against keys [lo, hi) of one path; scores in log2 units."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_kv = offs_n[:, None] < n_keys
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=in_kv, other=0.0)
        s = tl.dot(q, tl.trans(k))
        if MASK != NO_MASK:
            s = tl.where(_visible(offs_m[:, None], offs_n[None, :], MASK, STRIDE, WINDOW), s, float("-inf"))
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
    Q, K, V, KC, VC, BLEND, O, DCL, LSE_C, LSE_L,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
    skc_b, skc_t, skc_h, svc_b, svc_t, svc_h, sbl_b, sbl_t,
    T, Tc, H, qk_scale,
    G: tl.constexpr, D: tl.constexpr, STRIDE: tl.constexpr, WINDOW: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NL: tl.constexpr,
):
    m0 = (tl.cdiv(T, BLOCK_M) - 1 - tl.program_id(0)) * BLOCK_M  # late (costly) query blocks first
    pid_bh = tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    hk = h // G
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    in_t = offs_m < T
    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :]
    q = tl.load(q_ptrs, mask=in_t[:, None], other=0.0)

    # (1) compressed path: blocks j < m0 // STRIDE are visible to every row of the tile, the rest
    # up to the last row's limit (t // STRIDE) get the visibility mask.
    KCb, VCb = KC + b * skc_b + hk * skc_h, VC + b * svc_b + hk * svc_h
    acc_c = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_c = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_c = tl.full([BLOCK_M], -1e30, dtype=tl.float32)  # finite: fully masked tiles give alpha = 1, not NaN
    mid_c = (m0 // STRIDE) // BLOCK_N * BLOCK_N
    hi_c = tl.minimum((m0 + BLOCK_M - 1) // STRIDE, Tc)
    acc_c, l_c, m_c = _fwd_path(acc_c, l_c, m_c, q, KCb, VCb, skc_t, svc_t, Tc, offs_m, offs_d, 0, mid_c,
                                qk_scale, NO_MASK, STRIDE, WINDOW, BLOCK_N)
    acc_c, l_c, m_c = _fwd_path(acc_c, l_c, m_c, q, KCb, VCb, skc_t, svc_t, Tc, offs_m, offs_d, mid_c, hi_c,
                                qk_scale, COMP_MASK, STRIDE, WINDOW, BLOCK_N)
    # (2) local path: keys m0 - WINDOW + 1 .. m0 + BLOCK_M - 1 in tiles of BLOCK_NL from the first one
    # (unaligned: one tile when BLOCK_NL >= BLOCK_M + WINDOW - 1), all masked.
    Kb, Vb = K + b * sk_b + hk * sk_h, V + b * sv_b + hk * sv_h
    acc_l = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_l = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    lo_l = tl.maximum(m0 - WINDOW + 1, 0)
    hi_l = tl.minimum(m0 + BLOCK_M, T)
    acc_l, l_l, m_l = _fwd_path(acc_l, l_l, m_l, q, Kb, Vb, sk_t, sv_t, T, offs_m, offs_d, lo_l, hi_l,
                                qk_scale, WINDOW_MASK, STRIDE, WINDOW, BLOCK_NL)

    has_c = l_c > 0  # rows t < STRIDE see no compressed block: comp = 0 by definition
    comp = acc_c / tl.where(has_c, l_c, 1.0)[:, None]
    local = acc_l / tl.where(in_t, l_l, 1.0)[:, None]  # l_l >= 1 on real rows (the diagonal)
    blend = tl.load(BLEND + b * sbl_b + offs_m[:, None] * sbl_t + h * D + offs_d[None, :], mask=in_t[:, None],
                    other=0.0).to(tl.float32)
    out_offs = ((b * T + offs_m[:, None]) * H + h) * D + offs_d[None, :]
    tl.store(O + out_offs, (local + blend * (comp - local)).to(O.dtype.element_ty), mask=in_t[:, None])
    if SAVE:
        tl.store(DCL + out_offs, (comp - local).to(DCL.dtype.element_ty), mask=in_t[:, None])
        lse_offs = (b * H + h) * T + offs_m
        lse_c = tl.where(has_c, m_c + tl.log2(tl.where(has_c, l_c, 1.0)), float("inf"))
        tl.store(LSE_C + lse_offs, lse_c, mask=in_t)
        tl.store(LSE_L + lse_offs, m_l + tl.log2(tl.where(in_t, l_l, 1.0)), mask=in_t)


@triton.jit
def _bwd_dq_path(
    dq, q, do, lse, delta, K, V, stride_kt, stride_vt, n_keys, offs_m, offs_d, lo, hi, qk_scale,
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
            p = tl.where(_visible(offs_m[:, None], offs_n[None, :], MASK, STRIDE, WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _csa_bwd_dq(
    Q, K, V, KC, VC, BLEND, O, DCL, DO, LSE_C, LSE_L, DQ, DBLEND, DC, DL, DELTA_C, DELTA_L,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
    skc_b, skc_t, skc_h, svc_b, svc_t, svc_h, sbl_b, sbl_t,
    T, Tc, H, qk_scale, scale,
    G: tl.constexpr, D: tl.constexpr, STRIDE: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NL: tl.constexpr,
):
    m0 = (tl.cdiv(T, BLOCK_M) - 1 - tl.program_id(0)) * BLOCK_M
    pid_bh = tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    hk = h // G
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    in_t = offs_m < T
    row = in_t[:, None]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=row, other=0.0)
    offs = ((b * T + offs_m[:, None]) * H + h) * D + offs_d[None, :]  # contiguous [B, T, H, D] tensors
    do = tl.load(DO + offs, mask=row, other=0.0).to(tl.float32)
    o = tl.load(O + offs, mask=row, other=0.0).to(tl.float32)
    dcl = tl.load(DCL + offs, mask=row, other=0.0).to(tl.float32)
    blend = tl.load(BLEND + b * sbl_b + offs_m[:, None] * sbl_t + h * D + offs_d[None, :], mask=row,
                    other=0.0).to(tl.float32)

    # Split the gradient over the blend (3) and form each path's softmax-backward delta.
    tl.store(DBLEND + offs, (do * dcl).to(DBLEND.dtype.element_ty), mask=row)
    dc = blend * do
    dl = do - dc
    delta_c = tl.sum(dc * (o + (1.0 - blend) * dcl), 1)
    delta_l = tl.sum(dl * (o - blend * dcl), 1)
    dc, dl = dc.to(Q.dtype.element_ty), dl.to(Q.dtype.element_ty)
    tl.store(DC + offs, dc, mask=row)
    tl.store(DL + offs, dl, mask=row)
    lse_offs = (b * H + h) * T + offs_m
    tl.store(DELTA_C + lse_offs, delta_c, mask=in_t)
    tl.store(DELTA_L + lse_offs, delta_l, mask=in_t)
    lse_c = tl.load(LSE_C + lse_offs, mask=in_t, other=float("inf"))
    lse_l = tl.load(LSE_L + lse_offs, mask=in_t, other=float("inf"))

    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    KCb, VCb = KC + b * skc_b + hk * skc_h, VC + b * svc_b + hk * svc_h
    mid_c = (m0 // STRIDE) // BLOCK_N * BLOCK_N
    hi_c = tl.minimum((m0 + BLOCK_M - 1) // STRIDE, Tc)
    dq = _bwd_dq_path(dq, q, dc, lse_c, delta_c, KCb, VCb, skc_t, svc_t, Tc, offs_m, offs_d, 0, mid_c,
                      qk_scale, NO_MASK, STRIDE, WINDOW, BLOCK_N)
    dq = _bwd_dq_path(dq, q, dc, lse_c, delta_c, KCb, VCb, skc_t, svc_t, Tc, offs_m, offs_d, mid_c, hi_c,
                      qk_scale, COMP_MASK, STRIDE, WINDOW, BLOCK_N)
    Kb, Vb = K + b * sk_b + hk * sk_h, V + b * sv_b + hk * sv_h
    lo_l = tl.maximum(m0 - WINDOW + 1, 0)
    hi_l = tl.minimum(m0 + BLOCK_M, T)
    dq = _bwd_dq_path(dq, q, dl, lse_l, delta_l, Kb, Vb, sk_t, sv_t, T, offs_m, offs_d, lo_l, hi_l,
                      qk_scale, WINDOW_MASK, STRIDE, WINDOW, BLOCK_NL)
    tl.store(DQ + offs, (dq * scale).to(DQ.dtype.element_ty), mask=row)


@triton.jit
def _bwd_dkv_path(
    dk, dv, k, v, Q, DX, LSE, DELTA, sq_t, T, H, offs_n, offs_d, lo, hi, qk_scale,
    MASK: tl.constexpr, D: tl.constexpr, STRIDE: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dv += P^T dX, dk += dS^T Q over query rows [lo, hi) of one head (transposed tiles [keys, rows]).

    Q, DX point at the head's column in rows 0 (Q strided, DX contiguous [., T, H, D]); LSE, DELTA at
    the head's [T] row. Rows >= T load lse = inf, so their P is 0.
    """
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        in_t = offs_m < T
        q = tl.load(Q + offs_m[:, None] * sq_t + offs_d[None, :], mask=in_t[:, None], other=0.0)
        dx = tl.load(DX + offs_m[:, None] * (H * D) + offs_d[None, :], mask=in_t[:, None], other=0.0)
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
def _csa_bwd_dkv(
    Q, KC, VC, K, V, DC, DL, LSE_C, LSE_L, DELTA_C, DELTA_L, DKC, DVC, DK, DV,
    sq_b, sq_t, sq_h, skc_b, skc_t, skc_h, svc_b, svc_t, svc_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
    T, Tc, H, Hkv, n_comp_blocks, qk_scale, scale,
    G: tl.constexpr, D: tl.constexpr, STRIDE: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)  # compressed key blocks first (they have the longest row loops), then raw ones
    pid_bh = tl.program_id(1)
    b, hk = pid_bh // Hkv, pid_bh % Hkv
    offs_d = tl.arange(0, D)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    is_comp = pid < n_comp_blocks
    if is_comp:
        # compressed keys j in [n0, n0 + BLOCK_N): row t sees j iff t >= STRIDE (j + 1), so rows from
        # STRIDE (n0 + 1) see part of the block and rows from STRIDE (n0 + BLOCK_N) all of it.
        n0 = pid * BLOCK_N
        n_keys = Tc
        Kx, Vx, sx_t, svx_t = KC + b * skc_b + hk * skc_h, VC + b * svc_b + hk * svc_h, skc_t, svc_t
    else:
        # raw keys s in [n0, n0 + BLOCK_N): rows s .. s + WINDOW - 1 see them, all tiles masked.
        n0 = (pid - n_comp_blocks) * BLOCK_N
        n_keys = T
        Kx, Vx, sx_t, svx_t = K + b * sk_b + hk * sk_h, V + b * sv_b + hk * sv_h, sk_t, sv_t
    offs_n = n0 + tl.arange(0, BLOCK_N)
    in_kv = offs_n[:, None] < n_keys
    k = tl.load(Kx + offs_n[:, None] * sx_t + offs_d[None, :], mask=in_kv, other=0.0)
    v = tl.load(Vx + offs_n[:, None] * svx_t + offs_d[None, :], mask=in_kv, other=0.0)
    Qb, dx_off, lse_off = Q + b * sq_b, b * T * H * D, b * H * T
    if is_comp:
        lo = STRIDE * (n0 + 1)  # rows [lo, mid) need the visibility mask, rows [mid, T) see every key
        mid = tl.minimum(lo + tl.cdiv(STRIDE * (BLOCK_N - 1), BLOCK_M) * BLOCK_M, T)
        for h in range(hk * G, hk * G + G):
            DXh, LSEh, DELTAh = DC + dx_off + h * D, LSE_C + lse_off + h * T, DELTA_C + lse_off + h * T
            dk, dv = _bwd_dkv_path(dk, dv, k, v, Qb + h * sq_h, DXh, LSEh, DELTAh, sq_t, T, H, offs_n, offs_d,
                                   lo, mid, qk_scale, COMP_MASK, D, STRIDE, WINDOW, BLOCK_M)
            dk, dv = _bwd_dkv_path(dk, dv, k, v, Qb + h * sq_h, DXh, LSEh, DELTAh, sq_t, T, H, offs_n, offs_d,
                                   mid, T, qk_scale, NO_MASK, D, STRIDE, WINDOW, BLOCK_M)
    else:
        hi = tl.minimum(n0 + BLOCK_N + WINDOW - 1, T)
        for h in range(hk * G, hk * G + G):
            DXh, LSEh, DELTAh = DL + dx_off + h * D, LSE_L + lse_off + h * T, DELTA_L + lse_off + h * T
            dk, dv = _bwd_dkv_path(dk, dv, k, v, Qb + h * sq_h, DXh, LSEh, DELTAh, sq_t, T, H, offs_n, offs_d,
                                   n0, hi, qk_scale, WINDOW_MASK, D, STRIDE, WINDOW, BLOCK_M)
    out_offs = ((b * n_keys + offs_n[:, None]) * Hkv + hk) * D + offs_d[None, :]  # contiguous outputs
    if is_comp:
        tl.store(DKC + out_offs, (dk * scale).to(DKC.dtype.element_ty), mask=in_kv)
        tl.store(DVC + out_offs, dv.to(DVC.dtype.element_ty), mask=in_kv)
    else:
        tl.store(DK + out_offs, (dk * scale).to(DK.dtype.element_ty), mask=in_kv)
        tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=in_kv)


# Tile shapes and launch settings per kernel: the fastest correct ones of bench/csa.py's sweep on an H100
# (B 16, T 1024, H 9, Hkv 3, D 64; profiles/csa.json "sweep"). BLOCK_N tiles compressed keys (raw keys
# in _bwd_dkv), BLOCK_NL the window's raw keys.
CONFIG = {
    "fwd": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_NL=64, num_warps=4, num_stages=3),
    "bwd_dq": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_NL=128, num_warps=4, num_stages=3),
    "bwd_dkv": dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
}


def _strides(*xs: torch.Tensor) -> list[int]:
    """(batch, time, head) strides of each [B, T, H, D] tensor; blend [B, T, H * D] gives (batch, time)."""
    return [s for x in xs for s in x.stride()[:-1]]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim with stride 1; anything else is copied once."""
    return x if x.stride(-1) == 1 else x.contiguous()


def csa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
    blend: torch.Tensor, window: int, stride: int, scale: float, save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward; returns o [B, T, H, D] and, when `save`, dcl = comp - local and the two
    log2-sum-exps [B, H, T] (fp32; +inf for rows without a visible compressed block), else empty ones."""
    q, k, v, kc, vc, blend = (_rows(x) for x in (q, k, v, kc, vc, blend))
    B, T, H, D = q.shape
    Hkv, Tc = k.shape[2], kc.shape[1]
    o = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype)
    if save:
        dcl = torch.empty_like(o)
        lse_c, lse_l = (torch.empty(B, H, T, device=q.device, dtype=torch.float32) for _ in range(2))
    else:
        dcl, lse_c, lse_l = (o.new_empty(0) for _ in range(3))
    cfg = CONFIG["fwd"]
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * H)
    _csa_fwd[grid](
        q, k, v, kc, vc, blend, o, dcl, lse_c, lse_l, *_strides(q, k, v, kc, vc, blend),
        T, Tc, H, scale * LOG2E, G=H // Hkv, D=D, STRIDE=stride, WINDOW=window, SAVE=save, **cfg,
    )
    return o, dcl, lse_c, lse_l


def csa_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
    blend: torch.Tensor, o: torch.Tensor, dcl: torch.Tensor, lse_c: torch.Tensor, lse_l: torch.Tensor,
    window: int, stride: int, scale: float,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward; returns dq, dk, dv, dkc, dvc, dblend (contiguous, in the inputs' dtypes)."""
    q, k, v, kc, vc, blend = (_rows(x) for x in (q, k, v, kc, vc, blend))
    do = do.contiguous()
    B, T, H, D = q.shape
    Hkv, Tc = k.shape[2], kc.shape[1]
    dq, dc, dl = (torch.empty_like(o) for _ in range(3))
    dblend = torch.empty(B, T, H * D, device=q.device, dtype=blend.dtype)
    delta_c, delta_l = torch.empty_like(lse_c), torch.empty_like(lse_l)
    cfg = CONFIG["bwd_dq"]
    _csa_bwd_dq[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
        q, k, v, kc, vc, blend, o, dcl, do, lse_c, lse_l, dq, dblend, dc, dl, delta_c, delta_l,
        *_strides(q, k, v, kc, vc, blend), T, Tc, H, scale * LOG2E, scale,
        G=H // Hkv, D=D, STRIDE=stride, WINDOW=window, **cfg,
    )
    dkc, dvc = (torch.empty(B, Tc, Hkv, D, device=q.device, dtype=x.dtype) for x in (kc, vc))
    dk, dv = (torch.empty(B, T, Hkv, D, device=q.device, dtype=x.dtype) for x in (k, v))
    cfg = CONFIG["bwd_dkv"]
    n_comp = triton.cdiv(Tc, cfg["BLOCK_N"])
    _csa_bwd_dkv[(n_comp + triton.cdiv(T, cfg["BLOCK_N"]), B * Hkv)](
        q, kc, vc, k, v, dc, dl, lse_c, lse_l, delta_c, delta_l, dkc, dvc, dk, dv,
        *_strides(q, kc, vc, k, v), T, Tc, H, Hkv, n_comp, scale * LOG2E, scale,
        G=H // Hkv, D=D, STRIDE=stride, WINDOW=window, **cfg,
    )
    return dq, dk, dv, dkc, dvc, dblend


# torch.library ops: opaque to torch.compile (fullgraph works), differentiable through register_autograd.
@torch.library.custom_op("hyla::csa_fwd", mutates_args=())
def _csa_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
    blend: torch.Tensor, window: int, stride: int, scale: float, save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return csa_fwd(q, k, v, kc, vc, blend, window, stride, scale, save)


@_csa_fwd_op.register_fake
def _(q, k, v, kc, vc, blend, window, stride, scale, save):
    B, T, H, D = q.shape
    o = q.new_empty(B, T, H, D)
    if not save:
        return o, q.new_empty(0), q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    lse = q.new_empty(B, H, T, dtype=torch.float32)
    return o, torch.empty_like(o), lse, torch.empty_like(lse)


@torch.library.custom_op("hyla::csa_bwd", mutates_args=())
def _csa_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
    blend: torch.Tensor, o: torch.Tensor, dcl: torch.Tensor, lse_c: torch.Tensor, lse_l: torch.Tensor,
    window: int, stride: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return csa_bwd(do, q, k, v, kc, vc, blend, o, dcl, lse_c, lse_l, window, stride, scale)


@_csa_bwd_op.register_fake
def _(do, q, k, v, kc, vc, blend, o, dcl, lse_c, lse_l, window, stride, scale):
    B, T, H, D = q.shape
    return (
        q.new_empty(B, T, H, D), k.new_empty(k.shape), v.new_empty(v.shape), kc.new_empty(kc.shape),
        vc.new_empty(vc.shape), blend.new_empty(B, T, H * D),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, kc, vc, blend, ctx.window, ctx.stride, ctx.scale, save = inputs
    o, dcl, lse_c, lse_l = output
    ctx.save_for_backward(q, k, v, kc, vc, blend, o, dcl, lse_c, lse_l)


def _backward(ctx, do, *unused):
    q, k, v, kc, vc, blend, o, dcl, lse_c, lse_l = ctx.saved_tensors
    grads = _csa_bwd_op(do, q, k, v, kc, vc, blend, o, dcl, lse_c, lse_l, ctx.window, ctx.stride, ctx.scale)
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
    """Eager autograd path: the same launches as the custom ops, without their Python dispatch cost
    (tens of microseconds per call, which is most of the kernels' time at small batch)."""

    @staticmethod
    def forward(ctx, q, k, v, kc, vc, blend, window, stride, scale):
        o, dcl, lse_c, lse_l = csa_fwd(q, k, v, kc, vc, blend, window, stride, scale, True)
        ctx.save_for_backward(q, k, v, kc, vc, blend, o, dcl, lse_c, lse_l)
        ctx.window, ctx.stride, ctx.scale = window, stride, scale
        return o

    @staticmethod
    def backward(ctx, do):
        return (*csa_bwd(do, *ctx.saved_tensors, ctx.window, ctx.stride, ctx.scale), None, None, None)


def csa_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
    blend: torch.Tensor, window: int, stride: int, scale: float,
) -> torch.Tensor:
    """The fused kernel pair behind `kernels.csa.csa_attention(..., backend="triton")` (inputs checked there).

    k, v, kc, vc are cast to q's dtype (one dtype for the matrix units). Saves dcl and the
    log-sum-exps for the backward only when some input needs a gradient. Under torch.compile it goes
    through the torch.library ops (hyla::csa_fwd / hyla::csa_bwd), in eager through an autograd.Function.
    """
    check_inputs(q, k, v, kc, vc, blend)
    k, v, kc, vc = (x.to(q.dtype) for x in (k, v, kc, vc))
    save = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, kc, vc, blend))
    if torch.compiler.is_compiling():  # opaque ops in the graph
        return _csa_fwd_op(q, k, v, kc, vc, blend, window, stride, scale, save)[0]
    if save:
        return _CSAFunction.apply(q, k, v, kc, vc, blend, window, stride, scale)
    return csa_fwd(q, k, v, kc, vc, blend, window, stride, scale, False)[0]
