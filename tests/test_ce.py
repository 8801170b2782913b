"""Chunked linear cross-entropy (kernels/ce) against F.cross_entropy on materialized logits."""

import pytest
import torch
import torch.nn.functional as F

from kernels.ce import _accumulate_product, linear_cross_entropy, reference, triton_ce
from model import Hyla, get_config
from tests.helpers import compile_for_hopper, relerr, run_without_interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n=45, dim=24, vocab=70, dtype=torch.float64, ignored=(3, 10, 44)):
    x = torch.randn(n, dim, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, dim, dtype=dtype, requires_grad=True)
    y = torch.randint(0, vocab, (n,))
    y[list(ignored)] = -1
    return x, w, y


def _loss_and_grads(fn, x, w, y):
    x.grad = w.grad = None
    loss = fn(x, w, y)
    loss.backward()
    return loss.detach(), x.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk_rows", [1, 8, 45, 4096])
def test_matches_cross_entropy_fp64(chunk_rows):
    x, w, y = _inputs()
    ours = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=chunk_rows), x, w, y)
    ref = _loss_and_grads(lambda a, b, c: F.cross_entropy(a @ b.T, c, ignore_index=-1), x, w, y)
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-14)


def test_autocast_bf16_matches_plain_head():
    """Under bf16 autocast both compute the head in bf16 and the loss in fp32."""
    x, w, y = _inputs(dtype=torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        ours = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=16), x, w, y)
        ref = _loss_and_grads(lambda a, b, c: F.cross_entropy(F.linear(a, b).float(), c, ignore_index=-1), x, w, y)
    assert ours[0].dtype == torch.float32
    for o, r in zip(ours, ref, strict=True):
        assert o.dtype == r.dtype
        torch.testing.assert_close(o, r, rtol=2e-2, atol=1e-3)


def test_compiled_fullgraph_matches_eager():
    """The loss is one opaque custom op: torch.compile(fullgraph=True) traces through it, same values."""
    x, w, y = _inputs(dtype=torch.float32)
    fn = lambda a, b, c: linear_cross_entropy(a, b, c, chunk_rows=16)  # noqa: E731
    eager = _loss_and_grads(fn, x, w, y)
    compiled = _loss_and_grads(torch.compile(fn, fullgraph=True), x, w, y)
    for o, r in zip(compiled, eager, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


def test_no_grad_path_and_all_ignored():
    x, w, y = _inputs()
    with torch.no_grad():
        expected = F.cross_entropy(x @ w.T, y, ignore_index=-1)
        torch.testing.assert_close(linear_cross_entropy(x, w, y, chunk_rows=7), expected)
    assert linear_cross_entropy(x, w, torch.full_like(y, -1)).isnan()


def test_model_loss_equals_logits_loss():
    torch.manual_seed(0)
    model = Hyla(get_config("tiny", n_layers=2)).double()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 33))
    tgt = torch.randint(0, model.cfg.vocab_size, (2, 33))
    tgt[0, :5] = -1
    logits = model(idx)
    expected = F.cross_entropy(logits.flatten(0, 1), tgt.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(model(idx, tgt), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "x, w, y, match",
    [
        (torch.randn(4, 8), torch.randn(10, 6), torch.zeros(4, dtype=torch.long), "weight"),
        (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long), "targets"),
        (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4), "targets"),
        (torch.randn(2, 4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), "x"),
        (torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 10, 1, 2]), r"targets must be in \[0, 10\)"),
        (torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, -5, 1, 2]), r"targets must be in \[0, 10\)"),
    ],
)
def test_bad_input(x, w, y, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(x, w, y)


@pytest.mark.parametrize("n, vocab", [(5, 70), (7, 2048), (6, 5000)])
@pytest.mark.parametrize("with_grad", [True, False])
def test_triton_rows_match_reference(n, vocab, with_grad):
    """The Triton row step (interpreter on CPU, fp32) against the PyTorch one: one partial block, exactly one
    block, several blocks; an ignored row and a target in the last column."""
    g = torch.Generator().manual_seed(n)
    logits = (4 * torch.randn(n, vocab, generator=g)).to(DEVICE)
    targets = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    targets[1], targets[-1] = -1, vocab - 1
    scale = torch.tensor(1 / (n - 1), device=DEVICE)
    ours, ref = logits.clone(), logits.clone()
    loss = triton_ce.xent_rows_(ours, targets, -1, scale, with_grad)
    torch.testing.assert_close(loss, reference.xent_rows_(ref, targets, -1, scale, with_grad), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    if not with_grad:
        assert torch.equal(ours, logits)


def compile_all_for_hopper() -> int:
    """The row kernel for bf16 and fp32 logits, with and without the gradient pass; returns how many built."""
    built = 0
    for dt in ("*bf16", "*fp32"):
        for with_grad in (True, False):
            sig = {"z": dt, "targets": "*i64", "scale": "*fp32", "loss": "*fp32", "V": "i32", "ignore_index": "i32",
                   "WITH_GRAD": "constexpr", "BLOCK": "constexpr"}  # fmt: skip
            k = compile_for_hopper(triton_ce._xent_rows_kernel, sig, {"WITH_GRAD": with_grad, "BLOCK": triton_ce.BLOCK})
            built += bool(k.asm["cubin"])
    return built


def test_triton_kernel_compiles_for_hopper():
    """In a fresh process without TRITON_INTERPRET (the interpreter's kernels cannot be lowered)."""
    out = run_without_interpreter("from tests.test_ce import compile_all_for_hopper as f; print(f())")
    assert out.split()[-1] == "4", out


@pytest.mark.gpu
def test_gpu_bf16_model_shape_matches_plain_head():
    """The Triton path at the model's head size against F.cross_entropy on materialized fp32 logits."""
    torch.manual_seed(0)
    x = torch.randn(3000, 576, device="cuda", requires_grad=True)
    w = (torch.randn(32000, 576, device="cuda") / 24).requires_grad_()
    y = torch.randint(0, 32000, (3000,), device="cuda")
    y[::7] = -1
    with torch.autocast("cuda", torch.bfloat16):
        ours = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=1024, backend="triton"), x, w, y)
        ref = _loss_and_grads(lambda a, b, c: F.cross_entropy(F.linear(a, b).float(), c, ignore_index=-1), x, w, y)
    for o, r in zip(ours, ref, strict=True):
        assert relerr(o.double(), r.double()) < 1e-2


@pytest.mark.gpu
def test_gpu_extra_memory_is_one_chunk_of_logits():
    """Beyond dx and dW, the loss holds one chunk of logits at a time: a chunk's logits are freed before the next
    chunk's are allocated, and dW's chunk product goes straight into dW (holding two chunks, and the product with an
    fp32 copy of it, cost the compiled 95m training step 0.3 GiB of its peak)."""
    torch.manual_seed(0)
    n, vocab, dim, chunk_rows = 16384, 32000, 576, 4096
    x = torch.randn(n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, dim, device="cuda", dtype=torch.bfloat16) / 24).requires_grad_()
    y = torch.randint(0, vocab, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    linear_cross_entropy(x, w, y, chunk_rows=chunk_rows, backend="triton")
    extra = torch.cuda.max_memory_allocated() - before
    held = n * dim * 2 + vocab * dim * 4  # dx (bf16) and dW (fp32), kept for the backward
    chunk = chunk_rows * vocab * 2  # bf16 logits of one chunk
    assert extra < held + 1.1 * chunk, (extra - held) / chunk


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_gpu_products_accumulate_in_the_accumulator_dtype(dtype):
    """dW's per-chunk products summed into the accumulator (fp32; fp64 for fp64 chunks) by one cuBLAS call each,
    against float64: half-precision products are not rounded to their own dtype first."""
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator(device="cuda").manual_seed(0)
    a = [torch.randn(300, 1000, device="cuda", generator=g).to(dtype) for _ in range(4)]
    b = [torch.randn(1000, 200, device="cuda", generator=g).to(dtype) for _ in range(4)]
    acc = torch.zeros(300, 200, device="cuda", dtype=acc_dtype)
    for ai, bi in zip(a, b, strict=True):
        _accumulate_product(acc, ai, bi)
    ref = sum(ai.double() @ bi.double() for ai, bi in zip(a, b, strict=True))
    assert acc.dtype == acc_dtype
    assert relerr(acc.double(), ref) < (1e-12 if dtype == torch.float64 else 1e-5)
