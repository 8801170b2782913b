"""Causal depthwise conv + SiLU (kernels/conv): the reference against torch's grouped conv1d, the Triton
kernels against the float64 reference.

On CPU the Triton kernels run under TRITON_INTERPRET=1 in fp32 (the interpreter's bf16 is wrong), plus a
compile-only check for sm_90; on a GPU in bf16 at the model's shape. Outputs come from torch.empty under
deterministic mode (NaN-filled), so an element the kernels do not write fails the comparison.
"""

import pytest
import torch
import torch.nn.functional as F

from kernels.conv import causal_conv1d_silu, reference, triton_conv
from tests.helpers import compile_for_hopper, relerr, run_without_interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("poison_empty")  # tests/conftest.py


def make_inputs(B, T, C, W, device=DEVICE, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the model's weight is fp32
    w = (torch.randn(C, W, generator=g) / W**0.5).to(device=device, dtype=w_dtype).requires_grad_()
    return x, w


def grads_vs_reference(fn, x, w):
    """Our output and (dx, dw), and the float64 reference's, for one random output gradient."""
    y = fn(x, w)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    ours = tuple(t.cpu() for t in (y, *torch.autograd.grad(y, (x, w), dy)))
    x64, w64 = (t.detach().cpu().double().requires_grad_() for t in (x, w))
    y64 = reference.causal_conv1d_silu(x64, w64)
    return ours, (y64, *torch.autograd.grad(y64, (x64, w64), dy.cpu().double()))


def test_reference_matches_grouped_conv1d():
    x, w = make_inputs(2, 37, 10, 4, device="cpu", dtype=torch.float64)
    past = torch.randn(2, 3, 10, dtype=torch.float64)
    xp = torch.cat([past, x], 1)
    expected = F.silu(F.conv1d(xp.transpose(1, 2), w[:, None], groups=10).transpose(1, 2))
    torch.testing.assert_close(reference.causal_conv1d_silu(x, w, past), expected)
    # zero past = no past; decoding token by token with the last W - 1 inputs as past = the whole sequence
    torch.testing.assert_close(reference.causal_conv1d_silu(x, w, torch.zeros_like(past)), causal_conv1d_silu(x, w))
    steps = [causal_conv1d_silu(x[:, t : t + 1], w, xp[:, t : t + 3]) for t in range(x.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), expected)


@pytest.mark.parametrize(
    "B, T, C", [(1, 1, 5), (2, 3, 20), (2, 7, 20), (1, 64, 128), (1, 70, 130), (2, 129, 33), (1, 200, 257)]
)
def test_triton_matches_reference(B, T, C):
    """Shorter than the conv, several time tiles and segments (T > 64), partial channel blocks."""
    x, w = make_inputs(B, T, C, 4)
    ours, ref = grads_vs_reference(lambda x, w: triton_conv.triton_causal_conv1d_silu(x, w)[0], x, w)
    for name, o, r in zip(("y", "dx", "dw"), ours, ref, strict=True):
        assert relerr(o, r) < 1e-5, name


@pytest.mark.parametrize("B, T, C, chunks", [(2, 70, 198, 3), (1, 9, 6, 3), (1, 65, 258, 2)])
def test_triton_chunks_match_reference(B, T, C, chunks):
    """Output written as contiguous channel chunks (chunk width not a multiple of the channel blocks, and
    smaller than one), gradients read from them; a chunk without a gradient counts as zero."""
    x, w = make_inputs(B, T, C, 4)
    ys = triton_conv.triton_causal_conv1d_silu(x, w, chunks)
    assert all(y.is_contiguous() and y.shape == (B, T, C // chunks) for y in ys)
    ours, ref = grads_vs_reference(lambda x, w: torch.cat(triton_conv.triton_causal_conv1d_silu(x, w, chunks), -1),
                                   x, w)  # fmt: skip
    for name, o, r in zip(("y", "dx", "dw"), ours, ref, strict=True):
        assert relerr(o, r) < 1e-5, name
    dy = torch.randn(B, T, C // chunks)
    partial = torch.autograd.grad(ys[-1], (x, w), dy)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    last64 = reference.causal_conv1d_silu(x64, w64)[..., -(C // chunks) :]
    for o, r in zip(partial, torch.autograd.grad(last64, (x64, w64), dy.double()), strict=True):
        assert relerr(o, r) < 1e-5


def test_triton_reads_padded_rows():
    """x as a slice of wider rows (as inductor pads the 3024-wide projection output to 3072): read in place,
    same results as from a contiguous copy."""
    x, w = make_inputs(2, 70, 48, 4)
    wide = torch.randn(2, 70, 64)
    wide[..., :48] = x.detach()
    xs = wide[..., :48].requires_grad_()
    assert not xs.is_contiguous()
    ours, ref = grads_vs_reference(lambda x, w: torch.cat(triton_conv.triton_causal_conv1d_silu(x, w, 3), -1), xs, w)
    for name, o, r in zip(("y", "dx", "dw"), ours, ref, strict=True):
        assert relerr(o, r) < 1e-5, name


def test_chunks_dispatch():
    x, w = make_inputs(2, 10, 12, 4, device="cpu")
    y = causal_conv1d_silu(x, w)
    for n in (1, 3, 4):
        assert all(torch.equal(a, b) for a, b in zip(causal_conv1d_silu(x, w, chunks=n), y.chunk(n, -1), strict=True))
    with pytest.raises(ValueError, match="chunks must divide"):
        causal_conv1d_silu(x, w, chunks=5)


def test_triton_is_deterministic():
    x, w = make_inputs(2, 100, 42, 4)
    y = torch.cat(triton_conv.triton_causal_conv1d_silu(x, w, 3), -1)
    dy = torch.randn_like(y)
    first, second = (torch.autograd.grad(y, (x, w), dy, retain_graph=True) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(2, 5), torch.randn(5, 4)), "x must have shape"),
        ((torch.randn(2, 5, 6), torch.randn(5, 4)), "weight must have shape"),
        ((torch.randn(2, 5, 6), torch.randn(6, 9)), "conv width"),
        ((torch.randn(2, 5, 6), torch.randn(6, 4), torch.randn(2, 2, 6)), "past must have shape"),
        ((torch.randn(2, 0, 6), torch.randn(6, 4)), "empty"),
        ((torch.randint(0, 3, (2, 5, 6)), torch.randn(6, 4)), "dtype"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        causal_conv1d_silu(*args)


def compile_all_for_hopper() -> int:
    fwd = {"x": "*bf16", "w": "*fp32", "y0": "*bf16", "y1": "*bf16", "y2": "*bf16", "T": "i32", "SXB": "i32",
           "SXT": "i32", "CP": "i32"}
    bwd = {"x": "*bf16", "w": "*fp32", "dy0": "*bf16", "dy1": "*bf16", "dy2": "*bf16", "dx": "*bf16",
           "dw_part": "*fp32", "T": "i32", "C": "i32", "SXB": "i32", "SXT": "i32", "CP": "i32"}  # fmt: skip
    (fbt, fbc, _), (seg, bbc, _) = triton_conv.CONFIG["fwd"], triton_conv.CONFIG["bwd"]
    built = [compile_for_hopper(triton_conv._conv_silu_fwd_kernel, fwd, {"W": 4, "BT": fbt, "BC": fbc}),
             compile_for_hopper(triton_conv._conv_silu_bwd_kernel, bwd, {"S": seg, "BC": bbc})]  # fmt: skip
    return sum(bool(k.asm["cubin"]) for k in built)


def test_kernels_compile_for_hopper():
    """In a fresh process without TRITON_INTERPRET (the interpreter's nested @jit helpers cannot be lowered)."""
    out = run_without_interpreter("from tests.test_conv import compile_all_for_hopper as f; print(f())")
    assert out.split()[-1] == "2", out


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 63, 1024])
def test_gpu_bf16_model_shape(T):
    x, w = make_inputs(4, T, 3024, 4, dtype=torch.bfloat16, seed=T)
    ours, ref = grads_vs_reference(causal_conv1d_silu, x, w)
    for name, o, r in zip(("y", "dx", "dw"), ours, ref, strict=True):
        assert relerr(o, r) < 1e-2, name


@pytest.mark.gpu
def test_gpu_bf16_model_shape_chunks():
    """The model's call: q, k, v as three chunks of the 3024 channels."""
    x, w = make_inputs(4, 1024, 3024, 4, dtype=torch.bfloat16)
    fn = lambda x, w: torch.cat(causal_conv1d_silu(x, w, chunks=3), -1)  # noqa: E731
    ours, ref = grads_vs_reference(fn, x, w)
    for name, o, r in zip(("y", "dx", "dw"), ours, ref, strict=True):
        assert relerr(o, r) < 1e-2, name


@pytest.mark.gpu
def test_gpu_compiles_fullgraph():
    x, w = make_inputs(2, 100, 192, 4)
    y = torch.compile(causal_conv1d_silu, fullgraph=True)(x, w)
    torch.testing.assert_close(y, causal_conv1d_silu(x, w))
    split = torch.compile(lambda x, w: causal_conv1d_silu(x, w, chunks=3), fullgraph=True)(x, w)
    assert all(torch.equal(a, b) for a, b in zip(split, y.chunk(3, -1), strict=True))
    # behind a projection whose 3024-wide rows inductor pads (the model's layer), gradients included
    lin = torch.nn.Linear(64, 3024, bias=False, device="cuda")
    w3 = torch.randn(3024, 4, device="cuda")
    u = torch.randn(2, 100, 64, device="cuda", requires_grad=True)
    f = lambda u: sum(c.float().square().sum() for c in causal_conv1d_silu(lin(u), w3, chunks=3))  # noqa: E731
    eager = torch.autograd.grad(f(u), (u, lin.weight))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(u), (u, lin.weight))
    for a, b in zip(eager, compiled, strict=True):
        assert relerr(b, a) < 1e-5
