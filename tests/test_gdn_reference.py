"""Gated delta rule references: chunked (WY/UT) vs step-by-step recurrence, float64."""

import pytest
import torch
import torch.nn.functional as F
from helpers import relerr

from kernels.gdn import gated_delta_rule, l2norm
from kernels.gdn.reference import chunk_gated_delta_rule, recurrent_gated_delta_rule


def make_inputs(B, T, H, K, V, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    q, k, v = r(B, T, H, K), F.normalize(r(B, T, H, K), dim=-1), r(B, T, H, V)
    g = -torch.rand(B, T, H, generator=gen, dtype=dtype) * 2  # decays down to exp(-2) per step
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    h0 = r(B, H, K, V)
    return q, k, v, g, beta, h0


@pytest.mark.parametrize(
    "B,T,H,K,V",
    [(2, 1, 3, 16, 16), (1, 63, 2, 32, 24), (2, 65, 1, 16, 40), (1, 200, 3, 24, 24), (1, 130, 2, 112, 112)],
)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_recurrent(B, T, H, K, V, with_state):
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, seed=T + K)
    h0 = h0 if with_state else None
    o_rec, s_rec = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_chk, s_chk = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert relerr(o_chk, o_rec) < 1e-10
    assert relerr(s_chk, s_rec) < 1e-10
    assert chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0)[1] is None


def test_recurrence_definition_one_step():
    """T = 1 from a known state is equation (1)-(2) written out by hand."""
    q, k, v, g, beta, h0 = make_inputs(1, 1, 1, 4, 3)
    S = g.exp()[0, 0, 0] * h0[0, 0]
    kt, vt = k[0, 0, 0], v[0, 0, 0]
    S = S + torch.outer(kt, beta[0, 0, 0] * (vt - S.T @ kt))
    o_expected = 0.5 * S.T @ q[0, 0, 0]
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, scale=0.5, initial_state=h0, output_final_state=True)
    assert relerr(o[0, 0, 0], o_expected) < 1e-14
    assert relerr(s[0, 0], S) < 1e-14


def test_split_sequence_through_state():
    """Running [0, t) then [t, T) from the carried state equals one pass (prefill + decode contract)."""
    q, k, v, g, beta, _ = make_inputs(2, 150, 2, 16, 16, seed=3)
    o_full, s_full = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    o1, s1 = chunk_gated_delta_rule(
        q[:, :70], k[:, :70], v[:, :70], g[:, :70], beta[:, :70], output_final_state=True
    )
    o2, s2 = chunk_gated_delta_rule(
        q[:, 70:], k[:, 70:], v[:, 70:], g[:, 70:], beta[:, 70:], initial_state=s1, output_final_state=True
    )
    assert relerr(torch.cat([o1, o2], 1), o_full) < 1e-12
    assert relerr(s2, s_full) < 1e-12


def test_gradcheck_chunked():
    q, k, v, g, beta, h0 = make_inputs(1, 7, 1, 3, 2, seed=5)
    inputs = [x.requires_grad_() for x in (q, k, v, g, beta, h0)]

    def f(q, k, v, g, beta, h0):
        o, s = chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=4
        )
        return o, s

    assert torch.autograd.gradcheck(f, inputs)


def test_dispatch_l2norm_and_dtypes():
    q, k, v, g, beta, _ = make_inputs(1, 20, 2, 8, 8, dtype=torch.float32, seed=7)
    o, _ = gated_delta_rule(q, k * 3, v, g, beta, use_qk_l2norm=True)
    o_ref, _ = recurrent_gated_delta_rule(
        l2norm(q.double()), l2norm(k.double() * 3), v.double(), g.double(), beta.double()
    )
    assert o.dtype == torch.float32
    assert relerr(o, o_ref) < 1e-5
    qn = l2norm(q.double())
    expected = q.double() / (q.double().square().sum(-1, keepdim=True) + 1e-6).sqrt()
    assert relerr(qn, expected) < 1e-14


def gdn_args(B=1, T=2, H=1, K=8, V=8) -> dict:
    return dict(
        q=torch.randn(B, T, H, K),
        k=torch.randn(B, T, H, K),
        v=torch.randn(B, T, H, V),
        g=-torch.rand(B, T, H),
        beta=torch.rand(B, T, H),
    )


@pytest.mark.parametrize(
    "args,match",
    [
        ({**gdn_args(), "k": torch.randn(1, 2, 1, 4)}, "k must have shape"),
        ({**gdn_args(), "g": torch.randn(1, 2, 1, 1)}, "g must have shape"),
        ({**gdn_args(), "v": torch.ones(1, 2, 1, 8, dtype=torch.long)}, "v must have dtype"),
        (gdn_args(K=300), "head dims"),
        (gdn_args(V=257), "head dims"),
        ({**gdn_args(), "initial_state": torch.zeros(1, 1, 8, 9)}, "initial_state must have shape"),
        ({**gdn_args(), "backend": "nope"}, "unknown backend"),
        ({**gdn_args(), "q": torch.randn(1, 2, 1, 8, device="meta")}, "one device"),
    ],
)
def test_dispatch_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        gated_delta_rule(**args)
