"""The hybrid model: exact parameter count, finite forward/backward, overfitting, decoding, bad input."""

import pytest
import torch

from model import Hyla, HylaConfig, get_config
from model.config import PRESETS


def small_config(**kw) -> HylaConfig:
    return get_config("tiny", vocab_size=256, max_seq_len=160, **kw)


def randomize_zero_init(model: Hyla, std: float = 0.1) -> None:
    """Zero-initialized norms and scales would hide wiring mistakes: give them random values."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * std)


def test_95m_parameter_count():
    model = Hyla(PRESETS["95m"])
    assert model.num_params() == 95_715_408
    kinds = [b.kind for b in model.layers]
    assert kinds == ["gdn", "gdn", "csa", "full"] * 4
    # the tied head is the embedding: no separate output matrix
    assert sum(p.numel() for n, p in model.named_parameters() if "embedding" in n) == 32000 * 576
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["layers.0.mixer.conv1d.weight"] == (3024, 1, 4)
    assert shapes["layers.2.mixer.compress_k.weight"] == (192, 192)
    assert shapes["layers.2.mixer.blend_gate.weight"] == (576, 576)
    assert shapes["layers.3.mixer.wq.weight"] == (1152, 576)


def test_initialization_follows_spec():
    torch.manual_seed(0)
    model = Hyla(PRESETS["95m"])
    p = dict(model.named_parameters())
    assert abs(p["embedding.weight"].std().item() - 0.02) < 5e-4
    assert abs(p["layers.0.ffn.w3.weight"].std().item() - 0.02 / 32**0.5) < 1e-4
    assert abs(p["layers.0.ffn.w1.weight"].std().item() - 0.02) < 5e-4
    assert abs(p["layers.0.mixer.out_proj.weight"].std().item() - 0.02 / 32**0.5) < 1e-4
    assert p["layers.0.mixer.norm.weight"].eq(1).all() and p["layers.0.mixer.dt_bias"].eq(1).all()
    A = p["layers.0.mixer.A_log"].exp()
    assert A.min() >= 1 and A.max() <= 16
    assert p["layers.5.ffn_norm.weight"].eq(0).all() and p["layers.5.attn_residual_scale"].eq(0).all()
    conv = p["layers.0.mixer.conv1d.weight"]
    assert conv.abs().max() <= 0.5 and conv.std() > 0.2  # PyTorch default, U(-1/2, 1/2)


def test_forward_backward_finite():
    torch.manual_seed(0)
    model = Hyla(small_config())
    randomize_zero_init(model)
    idx = torch.randint(0, 256, (2, 150))
    logits = model(idx)
    assert logits.shape == (2, 150, 256) and torch.isfinite(logits).all()
    loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert 4.0 < loss.item() < 7.5  # near ln(256) = 5.5 at init
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items()), [
        n for n, g in grads.items() if g.abs().sum() == 0
    ]


def test_causal():
    torch.manual_seed(1)
    model = Hyla(small_config()).double()
    randomize_zero_init(model)
    idx = torch.randint(0, 256, (1, 120))
    idx2 = idx.clone()
    idx2[0, 80:] = (idx2[0, 80:] + 1) % 256
    a, b = model(idx), model(idx2)
    assert torch.equal(a[:, :80], b[:, :80])
    assert not torch.allclose(a[:, 80:], b[:, 80:])


def test_incremental_decoding_matches_full_forward():
    torch.manual_seed(2)
    model = Hyla(small_config()).double()
    randomize_zero_init(model)
    idx = torch.randint(0, 256, (2, 150))
    full = model(idx)
    cache, outs, i = model.new_cache(), [], 0
    for n in [37] + [1] * 43 + [9] + [1] * 61:  # prefill, decode, a mid-sequence chunk, decode
        outs.append(model(idx[:, i : i + n], cache=cache))
        i += n
    assert cache.pos == 150
    inc = torch.cat(outs, 1)
    assert (inc - full).abs().max() / full.abs().max() < 1e-12


@pytest.mark.slow
def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Hyla(small_config())
    idx = torch.randint(0, 256, (4, 65))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_rejects_bad_input():
    model = Hyla(small_config())
    with pytest.raises(ValueError, match="int64/int32"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[0, 256]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 161, dtype=torch.long))
    cache = model.new_cache()
    model(torch.zeros(1, 160, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_rejects_bad_config():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        HylaConfig(n_heads=9, n_kv_heads=2)
    with pytest.raises(ValueError, match="unknown layer kinds"):
        HylaConfig(layer_pattern=("gdn", "mamba"))
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("7b")
    with pytest.raises(ValueError, match="head dims"):  # the GDN kernels take head dims up to 256
        Hyla(small_config(gdn_head_dim=300))(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown config fields"):
        HylaConfig.from_dict({"dim": 8, "depth": 3})
