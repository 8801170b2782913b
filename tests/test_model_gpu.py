"""The model on a GPU: the Triton kernels the dispatch picks agree with the pure-PyTorch fallback,
torch.compile traces the whole model, and incremental decoding matches the full forward."""

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


def loss_and_grads(model, idx, backend, monkeypatch):
    monkeypatch.setenv("HYLA_BACKEND", backend)
    model.zero_grad()
    with torch.autocast("cuda", torch.bfloat16):
        loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_95m_kernels_match_reference(monkeypatch):
    model = randomized(get_config("95m"))
    idx = torch.randint(0, 32000, (2, 1025), device="cuda")
    loss_k, grads_k = loss_and_grads(model, idx, "auto", monkeypatch)
    loss_r, grads_r = loss_and_grads(model, idx, "reference", monkeypatch)
    assert abs(loss_k.item() - loss_r.item()) < 2e-3 * loss_r.item()
    worst = max((relerr(grads_k[n], grads_r[n]), n) for n in grads_r)
    assert worst[0] < 5e-2, worst


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
