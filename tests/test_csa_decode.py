"""CSADecodeState: token-by-token decoding equals the full csa_attention at every position (float64, CPU)."""

import pytest
import torch

from kernels.csa import CSADecodeState, compress_kv, reference
from kernels.rope import apply_rope, rope_tables

B, H, Hkv, D, T = 2, 6, 2, 16, 150  # T > 2 windows: the ring wraps twice; T % 4 = 2: a partial block


def sequence(seed: int = 0):
    """Per-token inputs of a whole sequence as a CSA layer makes them, in float64."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    cos, sin = rope_tables(torch.arange(T), 8, 20000.0, torch.float64)
    q, k_raw, v = apply_rope(rnd(B, T, H, D), cos, sin), rnd(B, T, Hkv, D), rnd(B, T, Hkv, D)
    k = apply_rope(k_raw, cos, sin)
    blend = torch.rand(B, T, H * D, generator=g, dtype=torch.float64)
    wk, wv = rnd(Hkv * D, Hkv * D) / (Hkv * D) ** 0.5, rnd(Hkv * D, Hkv * D) / (Hkv * D) ** 0.5
    return q, k, v, k_raw, blend, wk, wv


def full_output(q, k, v, k_raw, blend, wk, wv):
    kc, vc = compress_kv(k_raw, v, wk, wv, rotary_dim=8)
    return reference.csa_attention(q, k, v, kc, vc, blend)


def new_state(wk, wv):
    return CSADecodeState(B, Hkv, D, max_len=T, weight_k=wk, weight_v=wv, rotary_dim=8, dtype=torch.float64)


@pytest.mark.parametrize("prompt", [0, 64, 67])
def test_decode_matches_full_forward(prompt):
    q, k, v, k_raw, blend, wk, wv = sequence(prompt)
    full = full_output(q, k, v, k_raw, blend, wk, wv)
    state = new_state(wk, wv)
    if prompt:
        state.prefill(k[:, :prompt], v[:, :prompt], k_raw[:, :prompt])
    for t in range(prompt, T):
        out = state.step(q[:, t], k[:, t], v[:, t], k_raw[:, t], blend[:, t])
        torch.testing.assert_close(out, full[:, t], rtol=1e-12, atol=1e-12, msg=f"position {t}")
    assert state.pos == T


def test_decode_bad_input():
    q, k, v, k_raw, blend, wk, wv = sequence()
    with pytest.raises(ValueError, match="compress weights"):
        CSADecodeState(B, Hkv, D, T, wk[:, :5], wv)
    state = new_state(wk, wv)
    with pytest.raises(ValueError, match="k must have shape"):
        state.step(q[:, 0], k[:, 0, :1], v[:, 0], k_raw[:, 0], blend[:, 0])
    with pytest.raises(ValueError, match="q must be"):
        state.step(q[:, 0, :5], k[:, 0], v[:, 0], k_raw[:, 0], blend[:, 0])
    state.prefill(k, v, k_raw)
    with pytest.raises(ValueError, match="full"):
        state.step(q[:, 0], k[:, 0], v[:, 0], k_raw[:, 0], blend[:, 0])
