"""The fused Triton CSA kernels against the float64 PyTorch reference.

On CPU the kernels run under TRITON_INTERPRET=1 in fp32 at small shapes (the interpreter's bf16 is
wrong), plus a compile-only check of every kernel for sm_90. On a GPU: bf16 at the issue's lengths.
Every output is allocated by torch.empty under deterministic mode, which fills it with NaN (poison):
an element the kernels do not write fails the comparison.
"""

import inspect

import pytest
import torch

import kernels.csa as csa
from kernels.csa import reference, triton_compress, triton_csa
from tests.helpers import checking_launch_keyed, compile_for_hopper, relerr, run_without_interpreter

GRAD_NAMES = ("dq", "dk", "dv", "dkc", "dvc", "dblend")
# Tests below that take no `device` run their kernels where they can: the GPU if there is one, else the
# interpreter on CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("poison_empty")  # tests/conftest.py


def make_inputs(B, T, H, Hkv, D, device="cpu", dtype=torch.float32, strided=False, seed=0):
    """Fresh random inputs; `strided` takes q and blend as column slices of wider tensors (the model's
    q | gate and projection layouts), so the kernels see non-packed rows."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    Tc = -(-T // 4)
    if strided:
        q = rnd(B, T, H, 2 * D)[..., :D]
        blend = torch.rand(B, T, 2 * H * D, generator=g).to(device=device, dtype=dtype)[..., H * D :]
    else:
        q, blend = rnd(B, T, H, D), torch.rand(B, T, H * D, generator=g).to(device=device, dtype=dtype)
    xs = [q, rnd(B, T, Hkv, D), rnd(B, T, Hkv, D), rnd(B, Tc, Hkv, D), rnd(B, Tc, Hkv, D), blend]
    return [x.requires_grad_() for x in xs]


def run_both(xs, backend_fn):
    """Our output and grads, the float64 reference's, for one random output gradient."""
    out = backend_fn(*xs)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, xs, do)
    x64 = [x.detach().cpu().double().requires_grad_() for x in xs]
    ref = reference.csa_attention(*x64)
    ref_grads = torch.autograd.grad(ref, x64, do.cpu().double())
    return out, grads, ref, ref_grads


def grad_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error; a gradient that is 0 by construction (e.g. dq at T = 1: one visible key) is
    checked by its RMS instead, which must stay at rounding level."""
    if ref.norm() <= 1e-9 * ref.numel() ** 0.5:
        return (out.double().cpu().norm() / out.numel() ** 0.5).item()
    return relerr(out.cpu(), ref)


def triton_fn(*xs):
    return triton_csa.csa_attention_triton(*xs, 64, 4, xs[0].shape[-1] ** -0.5)


CPU_SHAPES = [  # B, T, H, Hkv, D
    *[(2, t, 3, 1, 16) for t in range(1, 9)],
    (1, 63, 6, 2, 32),
    (1, 65, 3, 3, 16),
    (1, 65, 3, 1, 64),
    (1, 130, 6, 3, 32),
    (1, 70, 8, 2, 16),  # 4 heads per KV head: packed row blocks of 16 tokens
    (1, 40, 9, 1, 16),  # 9 heads per KV head: blocks of 7.1 tokens, straddling tokens
    (2, 100, 4, 2, 16),  # grid 4 x 4 (b hk x row blocks): a program order that is not one-to-one fails
]


@pytest.mark.skipif(DEVICE == "cuda", reason="fp32 interpreter check for CPU CI; on a GPU see test_*_gpu")
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "B{}T{}H{}Hkv{}D{}".format(*s))
def test_matches_reference_interpreter(shape):
    xs = make_inputs(*shape, strided=shape[1] in (7, 130), seed=shape[1])
    out, grads, ref, ref_grads = run_both(xs, triton_fn)
    assert relerr(out, ref) < 1e-5
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert grad_error(g, r) < 1e-5, name


@pytest.mark.skipif(DEVICE == "cuda", reason="fp32 interpreter check for CPU CI; the GPU sweep in bench/csa.py")
def test_small_tiles_interpreter(monkeypatch):
    """Many small, unaligned tiles on every loop (the defaults cover one or two tiles per loop)."""
    small = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_NL=16, num_warps=1, num_stages=1)
    monkeypatch.setitem(triton_csa.CONFIG, "fwd", small)
    monkeypatch.setitem(triton_csa.CONFIG, "bwd_dq", small)
    dkv = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_MR=16, BLOCK_NR=32)
    monkeypatch.setitem(triton_csa.CONFIG, "bwd_dkv", {**dkv, "num_warps": 1, "num_stages": 1})
    xs = make_inputs(1, 150, 6, 2, 16, strided=True, seed=5)
    out, grads, ref, ref_grads = run_both(xs, triton_fn)
    assert relerr(out, ref) < 1e-5
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert grad_error(g, r) < 1e-5, name


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter check of the GPU fast path's arguments")
def test_launch_addresses_match_first_call(monkeypatch):
    """What each launcher hands `launch_keyed` (addresses into the workspaces, scalars) matches the tensor launch
    `first()` builds, for the saving forward, both backward launches and the forward without grad."""
    seen = []
    monkeypatch.setattr(triton_csa, "launch_keyed", checking_launch_keyed(seen))
    xs = make_inputs(2, 37, 6, 2, 16, seed=3)
    out, grads, ref, ref_grads = run_both(xs, triton_fn)
    with torch.no_grad():
        triton_fn(*xs)
    assert seen == ["fwd", "bwd_dq", "bwd_dkv", "fwd"]
    assert relerr(out, ref) < 1e-5
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert grad_error(g, r) < 1e-5, name


def test_causal():
    """Changing anything after position t0 (raw rows > t0, compressed blocks finished after t0) leaves
    rows <= t0 bit-identical."""
    B, T, H, Hkv, D, t0 = 1, 70, 3, 1, 16, 37
    xs = [x.detach() for x in make_inputs(B, T, H, Hkv, D, device=DEVICE)]
    out = triton_fn(*xs)
    q, k, v, kc, vc, blend = (x.clone() for x in xs)
    for x in (q, k, v, blend):
        x[:, t0 + 1 :] = 1e3 * torch.randn_like(x[:, t0 + 1 :])
    for x in (kc, vc):  # block j is visible at t iff t >= 4 (j + 1): blocks j >= t0 // 4 are not yet at t0
        x[:, t0 // 4 :] = 1e3 * torch.randn_like(x[:, t0 // 4 :])
    out2 = triton_fn(q, k, v, kc, vc, blend)
    assert torch.equal(out[:, : t0 + 1], out2[:, : t0 + 1])
    assert not torch.equal(out[:, t0 + 1 :], out2[:, t0 + 1 :])


def test_torch_compile_fullgraph():
    """The custom ops trace into one graph (aot_eager: no C++ compiler needed) and match eager."""
    xs = make_inputs(1, 20, 3, 1, 16, device=DEVICE)
    fn = torch.compile(triton_fn, fullgraph=True, backend="aot_eager")
    out, grads, _, _ = run_both(xs, fn)
    out_e, grads_e, _, _ = run_both(xs, triton_fn)
    assert torch.equal(out, out_e)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_e, strict=True))


def test_no_grad_forward_saves_nothing():
    xs = [x.detach() for x in make_inputs(1, 9, 3, 1, 16, device=DEVICE)]
    with torch.no_grad():
        out = triton_fn(*xs)
    assert triton_csa.csa_fwd(*xs, 64, 4, 0.25, False)[1] is None
    assert relerr(out.cpu(), reference.csa_attention(*(x.cpu().double() for x in xs))) < 2e-3  # tf32 on GPU


def test_bad_input():
    xs = [x.detach() for x in make_inputs(1, 9, 3, 1, 16)]
    with pytest.raises(ValueError, match="not available for device cpu"):
        csa.csa_attention(*xs, backend="triton")
    with pytest.raises(ValueError, match="head dims"):
        triton_csa.check_inputs(torch.zeros(1, 9, 3, 48), *xs[1:])
    with pytest.raises(ValueError, match="dtype"):
        triton_csa.check_inputs(xs[0].double(), *xs[1:])
    with pytest.raises(ValueError, match="kc must have shape"):
        csa.csa_attention(xs[0], xs[1], xs[2], xs[3][:, :2], xs[4], xs[5])


def test_compressor_bad_input():
    k, v, wk, wv = (x.detach() for x in compress_inputs(1, 9, 3, 16))
    with pytest.raises(ValueError, match="weight_k must have shape"):
        csa.compress_kv(k, v, wk[:, :16], wv)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        csa.compress_kv(k, v, wk, wv, rotary_dim=7)
    with pytest.raises(ValueError, match="not available for device cpu"):
        csa.compress_kv(k, v, wk, wv, rotary_dim=8, backend="triton")
    with pytest.raises(ValueError, match="head dims"):
        triton_compress.check_inputs(torch.zeros(1, 9, 3, 48), v)


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    """Argument types: the scales are fp32, the lengths T, Tc i32, the rest pointers."""
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("scale"):
            sig[name] = "fp32"
        elif name in ("T", "Tc"):
            sig[name] = "i32"
        else:
            sig[name] = "*fp32" if name.startswith(("LSE", "DELTA")) else f"*{dtype}"
    return sig


def compile_all_for_hopper() -> list[str]:
    """Compile every kernel for sm_90 (bf16, the model's H=9, Hkv=3, D=64); names of the cubins."""
    built = []
    for name in ("_compress_fwd", "_compress_bwd"):
        kernel = getattr(triton_compress, name)
        tiles = {k: v for k, v in triton_compress.CONFIG.items() if k not in ("num_warps", "num_stages")}
        constexprs = dict(HKV=3, D=64, HDP=256, STRIDE=4, R=32, **tiles)
        if name == "_compress_fwd":
            constexprs["SAVE"] = True
        kinds = {"T": "i32", "Tc": "i32", "n_rows": "i32", "COS": "*fp32", "SIN": "*fp32"}
        params = inspect.signature(kernel.fn).parameters
        sig = {n: "constexpr" if n in constexprs else kinds.get(n, "*bf16") for n in params}
        if compile_for_hopper(kernel, sig, constexprs).asm["cubin"]:
            built.append(name)
    for name, cfg_name in (("_csa_fwd", "fwd"), ("_csa_bwd_dq", "bwd_dq"), ("_csa_bwd_dkv", "bwd_dkv")):
        kernel, cfg = getattr(triton_csa, name), triton_csa.CONFIG[cfg_name]
        tiles = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages", "maxnreg")}
        constexprs = dict(H=9, HKV=3, D=64, STRIDE=4, WINDOW=64, **tiles)
        if name == "_csa_fwd":
            constexprs["SAVE"] = True
        compiled = compile_for_hopper(kernel, _signature(kernel, "bf16", constexprs), constexprs)
        if compiled.asm["cubin"]:
            built.append(name)
    return built


def test_compiles_for_hopper():
    """In a fresh interpreter-free process: under TRITON_INTERPRET=1, triton.language's own @jit helpers
    (tl.sum, tl.cdiv, ...) are interpreter objects that the compiler cannot lower."""
    out = run_without_interpreter("from tests.test_csa_triton import compile_all_for_hopper as f; print(*f())")
    names = ["_compress_fwd", "_compress_bwd", "_csa_fwd", "_csa_bwd_dq", "_csa_bwd_dkv"]
    assert out.split() == names, out


def compress_both(xs, fn, stride=4, rotary_dim=8, theta=100.0):
    """Outputs and gradients (k, v, weight_k, weight_v) of `fn` and of the float64 reference compressor."""
    kc, vc = fn(*xs, stride, rotary_dim, theta)
    g = torch.Generator().manual_seed(2)
    dkc, dvc = (torch.randn(x.shape, generator=g).to(x) for x in (kc, vc))
    grads = torch.autograd.grad((kc * dkc).float().sum() + (vc * dvc).float().sum(), xs)
    x64 = [x.detach().cpu().double().requires_grad_() for x in xs]
    rk, rv = reference.compress_kv(*x64, stride, rotary_dim, theta)
    ref_grads = torch.autograd.grad((rk * dkc.cpu().double()).sum() + (rv * dvc.cpu().double()).sum(), x64)
    return [kc, vc, *grads], [rk, rv, *ref_grads]


def compress_inputs(B, T, Hkv, D, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(B, T, Hkv, D, generator=g) for _ in range(2))
    wk, wv = (torch.randn(Hkv * D, Hkv * D, generator=g) / (Hkv * D) ** 0.5 for _ in range(2))
    return [x.to(device=device, dtype=dtype).requires_grad_() for x in (k, v, wk, wv)]


@pytest.mark.parametrize("B, T, Hkv, D, rotary_dim", [(2, 10, 3, 16, 8), (1, 13, 2, 32, 32), (2, 3, 1, 16, 0)])
def test_compressor_matches_reference(B, T, Hkv, D, rotary_dim):
    """Partial last block (T % 4 != 0), several heads mixed by the weights, full / partial / no RoPE."""
    xs = compress_inputs(B, T, Hkv, D, device=DEVICE, seed=T)
    outs, refs = compress_both(xs, triton_compress.compress_kv_triton, rotary_dim=rotary_dim)
    tol = 1e-5 if DEVICE == "cpu" else 2e-3  # tf32 products on a GPU
    for name, a, r in zip(("kc", "vc", "dk", "dv", "dwk", "dwv"), outs, refs, strict=True):
        assert relerr(a.cpu(), r) < tol, name


GPU_LENGTHS = [*range(1, 9), 63, 65, 1000, 4096]


@pytest.mark.gpu
@pytest.mark.parametrize("T", GPU_LENGTHS)
def test_bf16_gpu(T):
    B = 2 if T < 4096 else 1
    xs = make_inputs(B, T, 9, 3, 64, device="cuda", dtype=torch.bfloat16, strided=T == 1000, seed=T)
    out, grads, ref, ref_grads = run_both(xs, lambda *x: csa.csa_attention(*x, backend="auto"))
    assert relerr(out.cpu(), ref) < 5e-3
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert grad_error(g, r) < 1e-2, name


@pytest.mark.gpu
def test_fp32_gpu_and_errors():
    xs = make_inputs(2, 200, 9, 3, 64, device="cuda", dtype=torch.float32, seed=3)
    out, grads, ref, ref_grads = run_both(xs, lambda *x: csa.csa_attention(*x, backend="triton"))
    assert relerr(out.cpu(), ref) < 2e-3  # tf32 dots
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert grad_error(g, r) < 5e-3, name
    with pytest.raises(ValueError, match="head dims"):
        csa.csa_attention(
            torch.zeros(1, 9, 3, 48, device="cuda"),
            *[torch.zeros(1, 9, 1, 48, device="cuda")] * 2,
            *[torch.zeros(1, 3, 1, 48, device="cuda")] * 2,
            torch.zeros(1, 9, 144, device="cuda"),
        )


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 7, 1000, 4096])
def test_compressor_bf16_gpu(T):
    xs = compress_inputs(2, T, 3, 64, device="cuda", dtype=torch.bfloat16, seed=T)
    fused = lambda *a: csa.compress_kv(*a, backend="auto")
    outs, refs = compress_both(xs, fused, rotary_dim=32, theta=20000.0)
    for name, a, r in zip(("kc", "vc", "dk", "dv", "dwk", "dwv"), outs, refs, strict=True):
        assert relerr(a.cpu(), r) < 1e-2, name
