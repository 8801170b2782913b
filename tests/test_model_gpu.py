"""The model on a GPU: the Triton kernels the dispatch picks agree with the pure-PyTorch fallback,
torch.compile traces the whole model, and incremental decoding matches the full forward."""

import os

import pytest
import torch
from helpers import relerr

from model import Hyla, get_config

pytestmark = pytest.mark.gpu


def randomized(cfg, seed=0):
    torch.manual_seed(seed)
    model = Hyla(cfg).cuda()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def loss_and_grads(model, idx, backend, autocast=True):
    os.environ["HYLA_BACKEND"] = backend
    try:
        model.zero_grad()
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
    finally:
        del os.environ["HYLA_BACKEND"]
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def runs_95m():
    """The 95m model's loss and gradients three ways: an fp32 run of the reference ops (the truth),
    and bf16 autocast runs through the kernels and through the reference ops."""
    model = randomized(get_config("95m"))
    idx = torch.randint(0, 32000, (2, 1025), device="cuda")
    return {
        "truth": loss_and_grads(model, idx, "reference", autocast=False),
        "kernels": loss_and_grads(model, idx, "auto"),
        "reference": loss_and_grads(model, idx, "reference"),
    }


GATE_PARAMS = ("mixer.A_log", "mixer.dt_bias")  # per-head sums over every token of dg


def less_accurate(runs, names):
    """name: (kernel-path error, reference-path error) where the kernels are clearly worse."""
    truth, kern, ref = runs["truth"][1], runs["kernels"][1], runs["reference"][1]
    errs = {n: (relerr(kern[n], truth[n]), relerr(ref[n], truth[n])) for n in names}
    return {n: e for n, e in errs.items() if e[0] > max(2 * e[1], 1e-2)}


def test_95m_kernels_as_accurate_as_reference(runs_95m):
    """Under bf16 autocast the kernel path is about as close to the fp32 truth as the reference path."""
    loss_t, loss_k, loss_r = (runs_95m[k][0] for k in ("truth", "kernels", "reference"))
    assert abs(loss_k - loss_t) <= 2 * abs(loss_r - loss_t) + 1e-3 * loss_t
    names = [n for n in runs_95m["truth"][1] if not n.endswith(GATE_PARAMS)]
    assert not less_accurate(runs_95m, names)


@pytest.mark.xfail(
    strict=True,
    reason="GDN Triton dg uses bf16-rounded states: A_log / dt_bias gradients of one layer reach 3x the "
    "reference path's error on the H100 (0.067 vs 0.021); fix: fp32 states in the backward",
)
def test_95m_gate_gradients_as_accurate_as_reference(runs_95m):
    names = [n for n in runs_95m["truth"][1] if n.endswith(GATE_PARAMS)]
    assert not less_accurate(runs_95m, names)


def test_compile_fullgraph():
    model = randomized(get_config("tiny", max_seq_len=512))
    idx = torch.randint(0, 2048, (2, 300), device="cuda")
    eager = model(idx)
    compiled = torch.compile(model, fullgraph=True)(idx)
    assert relerr(compiled, eager) < 1e-3


def test_incremental_decoding_on_gpu():
    model = randomized(get_config("tiny", max_seq_len=256)).eval()
    idx = torch.randint(0, 2048, (2, 200), device="cuda")
    with torch.no_grad():
        full = model(idx)
        cache, outs, i = model.new_cache(), [], 0
        for n in [70] + [1] * 60 + [5] + [1] * 65:
            outs.append(model(idx[:, i : i + n], cache=cache))
            i += n
    assert relerr(torch.cat(outs, 1), full) < 1e-3
