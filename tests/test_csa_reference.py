"""CSA reference: brute-force dense check, causality, rows t < stride, GQA grouping, compressor."""

import pytest
import torch
from helpers import relerr

from kernels.csa import compress_kv, csa_attention
from kernels.rope import apply_rope, rope_tables


def make_inputs(B, T, H, Hkv, D, stride=4, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    Tc = -(-T // stride)
    blend = torch.rand(B, T, H * D, generator=gen, dtype=dtype)
    return r(B, T, H, D), r(B, T, Hkv, D), r(B, T, Hkv, D), r(B, Tc, Hkv, D), r(B, Tc, Hkv, D), blend


def brute_force(q, k, v, kc, vc, blend, window, stride):
    """Dense masked softmax over repeated K/V, one query row at a time for the compressed path."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    k, v, kc, vc = (x.repeat_interleave(G, dim=2) for x in (k, v, kc, vc))
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    local_mask = (s <= t) & (s > t - window)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / D**0.5
    local = torch.einsum("bhts,bshd->bthd", scores.masked_fill(~local_mask, float("-inf")).softmax(-1), v)
    comp = torch.zeros_like(local)
    for tt in range(T):
        j = [jj for jj in range(kc.shape[1]) if tt >= stride * (jj + 1)]
        if j:
            sc = torch.einsum("bhd,bjhd->bhj", q[:, tt], kc[:, j]) / D**0.5
            comp[:, tt] = torch.einsum("bhj,bjhd->bhd", sc.softmax(-1), vc[:, j])
    b = blend.view(B, T, H, D)
    return b * comp + (1 - b) * local


@pytest.mark.parametrize("T", [1, 3, 4, 5, 8, 63, 64, 65, 130, 200])
@pytest.mark.parametrize("H,Hkv", [(9, 3), (2, 2), (4, 1)])
def test_matches_brute_force(T, H, Hkv):
    inputs = make_inputs(2, T, H, Hkv, 16, seed=T)
    out = csa_attention(*inputs)
    assert relerr(out, brute_force(*inputs, window=64, stride=4)) < 1e-12


def test_other_window_and_stride():
    inputs = make_inputs(1, 50, 3, 1, 8, stride=3, seed=1)
    out = csa_attention(*inputs, window=7, stride=3)
    assert relerr(out, brute_force(*inputs, window=7, stride=3)) < 1e-12


def test_causality():
    q, k, v, kc, vc, blend = make_inputs(1, 100, 3, 1, 16, seed=2)
    out = csa_attention(q, k, v, kc, vc, blend)
    t = 57
    q2, k2, v2, blend2 = (x.clone() for x in (q, k, v, blend))
    for x in (q2, k2, v2, blend2):
        x[:, t + 1 :] += 1.0
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[:, (t + 1) // 4 :] += 1.0  # blocks not finished at t
    vc2[:, (t + 1) // 4 :] += 1.0
    out2 = csa_attention(q2, k2, v2, kc2, vc2, blend2)
    assert torch.equal(out[:, : t + 1], out2[:, : t + 1])
    assert not torch.equal(out[:, t + 1 :], out2[:, t + 1 :])


def test_rows_before_first_block_are_local_only():
    """t < stride sees no finished block: with blend = 1 those rows are exactly 0, gradients finite."""
    q, k, v, kc, vc, _ = make_inputs(1, 12, 3, 1, 16, seed=3)
    blend = torch.ones(1, 12, 48, dtype=torch.float64)
    for x in (q, kc, vc):
        x.requires_grad_()
    out = csa_attention(q, k, v, kc, vc, blend)
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    assert out[:, 4:].abs().min() > 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :4], torch.zeros_like(q.grad[:, :4]))
    assert torch.isfinite(kc.grad).all() and torch.isfinite(vc.grad).all()


def test_gqa_grouping():
    """Query head h reads KV head h // (H / Hkv): changing KV head 1 moves only query heads 3..5."""
    q, k, v, kc, vc, blend = make_inputs(1, 40, 9, 3, 16, seed=4)
    out = csa_attention(q, k, v, kc, vc, blend)
    for x in (k, v, kc, vc):
        x[:, :, 1] += 0.5
    out2 = csa_attention(q, k, v, kc, vc, blend)
    changed = (out2 - out).abs().amax(dim=(0, 1, 3)) > 0
    assert changed.tolist() == [False] * 3 + [True] * 3 + [False] * 3


def test_compressor():
    B, T, Hkv, D, S = 2, 10, 3, 16, 4
    gen = torch.Generator().manual_seed(5)
    k, v = (
        torch.randn(B, T, Hkv, D, generator=gen, dtype=torch.float64),
        torch.randn(B, T, Hkv, D, dtype=torch.float64),
    )
    wk, wv = (
        torch.randn(Hkv * D, Hkv * D, dtype=torch.float64),
        torch.randn(Hkv * D, Hkv * D, dtype=torch.float64),
    )
    kc, vc = compress_kv(k, v, wk, wv, stride=S, rotary_dim=8, theta=100.0)
    assert kc.shape == vc.shape == (B, 3, Hkv, D)
    for j in range(3):
        block = slice(S * j, min(S * (j + 1), T))
        kmean = k[:, block].reshape(B, -1, Hkv * D).sum(1) / S  # zero padding counts in the mean
        vmean = v[:, block].reshape(B, -1, Hkv * D).sum(1) / S
        cos, sin = rope_tables(torch.tensor([S * j + S // 2]), 8, 100.0, dtype=torch.float64)
        k_expected = apply_rope((kmean @ wk.T).view(B, 1, Hkv, D), cos, sin)[:, 0]
        assert relerr(kc[:, j], k_expected) < 1e-14
        assert relerr(vc[:, j], (vmean @ wv.T).view(B, Hkv, D)) < 1e-14


def test_rope_convention():
    """rotate-half on the first rotary_dim dims: x1 = x[:r/2], x2 = x[r/2:r], x cos + cat(-x2, x1) sin."""
    x = torch.randn(5, 2, 64, dtype=torch.float64)
    pos = torch.arange(5)
    cos, sin = rope_tables(pos, 32, 20000.0, dtype=torch.float64)
    out = apply_rope(x, cos, sin)
    inv_freq = 20000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    ang = pos[:, None, None] * inv_freq  # [5, 1, 16]
    x1, x2 = x[..., :16], x[..., 16:32]
    assert relerr(out[..., :16], x1 * ang.cos() - x2 * ang.sin()) < 1e-14
    assert relerr(out[..., 16:32], x2 * ang.cos() + x1 * ang.sin()) < 1e-14
    assert torch.equal(out[..., 32:], x[..., 32:])


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("k", torch.zeros(1, 8, 2, 16), "multiple of KV heads"),
        ("kc", torch.zeros(1, 3, 1, 16), "kc must have shape"),
        ("blend", torch.zeros(1, 8, 16), "blend must have shape"),
        ("q", torch.zeros(1, 8, 3, 16, dtype=torch.int32), "q must have dtype"),
    ],
)
def test_rejects_bad_input(name, bad, match):
    args = dict(
        zip(
            ["q", "k", "v", "kc", "vc", "blend"],
            make_inputs(1, 8, 3, 1, 16, dtype=torch.float32),
            strict=True,
        )
    )
    args[name] = bad
    with pytest.raises(ValueError, match=match):
        csa_attention(**args)
