"""The C++ autograd node of the eager CSA op (csrc/csa/csa_node.cpp, kernels/csa/node.py).

On CPU: the extension builds against this torch (a C++ syntax or API error fails here), its plans reject
malformed kernel descriptions, and `kernels.common.bound_kernel` reads a compiled kernel's launch facts. On
a GPU: the node's outputs and gradients are bitwise those of the Python autograd.Function path (same
kernels, same arguments), for several lengths, a non-contiguous output gradient, and the model's CSA layer in
training; inputs it must leave to the Python path; a process whose first backward is the node's.
"""

from types import SimpleNamespace

import pytest
import torch

import kernels.csa as csa
from kernels import common
from kernels.csa import node
from tests.helpers import relerr, run_without_interpreter
from tests.test_csa_triton import GRAD_NAMES, make_inputs

pytestmark = pytest.mark.usefixtures("poison_empty")  # tests/conftest.py

FWD_KINDS = [1] * 9 + [2, 2, 4]  # q k v kc vc blend o dcl lse, T, Tc, qk_scale


def fake_compiled(signature: dict, **metadata):
    md = dict(global_scratch_size=0, profile_scratch_size=0, num_ctas=1, launch_pdl=False, num_warps=4, shared=512)
    md.update(metadata)
    return SimpleNamespace(function=1234, src=SimpleNamespace(signature=signature), metadata=SimpleNamespace(**md))


def test_bound_kernel_reads_signature_and_launch_facts(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    sig = {"X": "*bf16", "Y": "*fp32", "T": "i32", "N": "i64", "s": "fp32", "one": "constexpr", "BLOCK": "constexpr"}
    kernel, other = object(), object()
    monkeypatch.setitem(common._BOUND, (id(kernel), ("k",), 0), (None, None, None, (), 3, 2, 1, fake_compiled(sig)))
    assert common.bound_kernel(kernel, ("k",), 6) == (1234, (3, 2, 1), 128, 512, 2, [1, 1, 2, 3, 4, 0])
    assert common.bound_kernel(kernel, ("other",), 6) is None  # not bound yet
    assert common.bound_kernel(other, ("k",), 6) is None  # another kernel under the same key
    for bad in (dict(global_scratch_size=64), dict(num_ctas=2), dict(launch_pdl=True)):
        entry = (None, None, None, (), 3, 2, 1, fake_compiled(sig, **bad))
        monkeypatch.setitem(common._BOUND, (id(kernel), ("k",), 0), entry)
        assert common.bound_kernel(kernel, ("k",), 6) is False
    entry = (None, None, None, (), 3, 2, 1, fake_compiled({**sig, "X": "u64"}))
    monkeypatch.setitem(common._BOUND, (id(kernel), ("k",), 0), entry)
    assert common.bound_kernel(kernel, ("k",), 6) is False  # an argument type the node cannot pack


@pytest.mark.slow
def test_extension_builds_and_checks_plans():
    ext = node.extension()
    assert ext is not None, "csrc/csa/csa_node.cpp did not build (see the warning)"
    n_fwd, n_dq, n_dkv = ext.ARG_COUNTS  # the runtime arguments of its three launches: pointers, then scalars
    assert n_fwd == len(FWD_KINDS)
    fwd = (1, (4, 2, 1), 128, 0, 2, FWD_KINDS)
    dq = (1, (4, 2, 1), 128, 0, 2, [1] * (n_dq - 4) + [2, 2, 4, 4])
    dkv = (1, (4, 3, 1), 128, 0, 2, [1] * (n_dkv - 4) + [2, 2, 4, 4])
    layouts = (1024, 0, 512), (2048, 0, 1024)
    assert isinstance(ext.make_plan(fwd, dq, dkv, 16, 4, 0.18, 0.125, *layouts), ext.Plan)
    for bad, message in [
        ((1, (4, 2, 1), 128, 0, 2, FWD_KINDS[:-1]), "argument kinds"),
        ((0, (4, 2, 1), 128, 0, 2, FWD_KINDS), "null kernel"),
        ((1, (4, 0, 1), 128, 0, 2, FWD_KINDS), "bad grid"),
        ((1, (4, 2, 1), 2048, 0, 2, FWD_KINDS), "bad launch sizes"),
        ((1, (4, 2, 1), 128, 0, 2, FWD_KINDS[:-1] + [9]), "unknown argument kind"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            ext.make_plan(bad, dq, dkv, 16, 4, 0.18, 0.125, *layouts)


def grads_of(xs, do):
    out = csa.csa_attention(*xs, backend="triton")
    return out, torch.autograd.grad(out, xs, do)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 7, 300, 1024])
def test_node_matches_python_path_bitwise_gpu(monkeypatch, T):
    xs = make_inputs(2, T, 9, 3, 64, device="cuda", dtype=torch.bfloat16, seed=T)
    do = torch.randn(2, T, 9, 64, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(node, "ENABLED", False)
    out_py, grads_py = grads_of(xs, do)  # the Python path; its first call binds the three kernels
    assert "CSANode" not in out_py.grad_fn.name()
    monkeypatch.setattr(node, "ENABLED", True)
    for g in (do, do.transpose(1, 2).contiguous().transpose(1, 2)):  # contiguous, then a strided gradient
        out, grads = grads_of(xs, g)
        assert "CSANode" in out.grad_fn.name(), out.grad_fn.name()
        assert torch.equal(out, out_py)
        for name, a, b in zip(GRAD_NAMES, grads, grads_py, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.gpu
def test_node_leaves_misaligned_inputs_to_python_gpu():
    xs = make_inputs(1, 64, 9, 3, 64, device="cuda", dtype=torch.bfloat16)
    do = torch.randn(1, 64, 9, 64, device="cuda", dtype=torch.bfloat16)
    grads_of(xs, do)  # binds the kernels for these shapes
    assert "CSANode" in grads_of(xs, do)[0].grad_fn.name()
    q = torch.empty(xs[0].numel() + 1, device="cuda", dtype=torch.bfloat16)[1:].view_as(xs[0])  # 2-byte offset
    q.copy_(xs[0].detach()).requires_grad_()
    out, grads = grads_of([q, *xs[1:]], do)
    assert "CSANode" not in out.grad_fn.name()
    ref_out, ref_grads = grads_of(xs, do)  # the same inputs, aligned: through the node
    assert relerr(out, ref_out) < 1e-2
    for name, a, b in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert relerr(a, b) < 1e-2, name


@pytest.mark.gpu
def test_node_backward_first_on_autograd_thread_gpu():
    """In a fresh process whose first backward is the node's, autograd's device thread has made no CUDA call
    yet (no current context) when the node launches there: the node makes the device's context current."""
    code = """
import torch
from kernels.csa import triton_csa
from tests.test_csa_triton import make_inputs
xs = make_inputs(1, 64, 9, 3, 64, device="cuda", dtype=torch.bfloat16)
x0 = [x.detach() for x in xs]
o, ws = triton_csa.csa_fwd(*x0, 64, 4, 0.125, True)  # binds the three kernels on this thread
triton_csa.csa_bwd(torch.randn_like(o), *x0, o, ws, 64, 4, 0.125)
out = triton_csa.csa_attention_triton(*xs, 64, 4, 0.125)
assert "CSANode" in out.grad_fn.name(), out.grad_fn.name()
grads = torch.autograd.grad(out, xs, torch.randn_like(out))
torch.cuda.synchronize()
print(all(bool(torch.isfinite(g).all()) for g in grads))
"""
    assert run_without_interpreter(code, timeout=120).split()[-1] == "True"


@pytest.mark.gpu
def test_model_csa_layer_trains_through_the_node_gpu(monkeypatch):
    """The model's CSA layer in eager training: from its second step its attention runs through the node, and
    the gradients of the layer's input and parameters equal those of the Python path."""
    from model import model as model_mod
    from model.config import HylaConfig

    cfg, T = HylaConfig(), 256
    torch.manual_seed(0)
    layer = model_mod.CSA(cfg).cuda().to(torch.bfloat16)
    rope = tuple(t.cuda() for t in model_mod.rope_tables(torch.arange(T), cfg.rotary_dim, cfg.rope_theta))
    x = torch.randn(2, T, cfg.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    leaves = [x, *layer.parameters()]
    core, seen = model_mod.csa_attention, []

    def recording(*args, **kwargs):
        out = core(*args, **kwargs)
        seen.append(out.grad_fn.name())
        return out

    monkeypatch.setattr(model_mod, "csa_attention", recording)
    monkeypatch.setattr(node, "ENABLED", False)
    expected = torch.autograd.grad(layer(x, rope), leaves, dy)  # the Python path, which binds the kernels
    monkeypatch.setattr(node, "ENABLED", True)
    got = torch.autograd.grad(layer(x, rope), leaves, dy)
    assert "CSANode" not in seen[0] and "CSANode" in seen[1], seen
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
