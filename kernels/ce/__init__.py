"""Cross-entropy of a linear head, computed over row chunks so the [N, vocab] logits never exist whole.

With a 32K vocabulary the logits of one 32 x 1024 batch are 1.0e9 values: 2 GiB in bf16, 4 GiB each for
the fp32 copy, the log-softmax and its gradient. `linear_cross_entropy` computes, per chunk of rows,
logits -> log-sum-exp -> loss, and when a gradient is needed the chunk's logit gradient
    dL/dlogits = (softmax(logits) - onehot(target)) / n_valid
right away, folding it into dx (rows of the chunk) and dW (accumulated in fp32). The backward only scales
the stored dx, dW by the incoming gradient. Peak extra memory is one chunk of logits; the FLOPs are those of
the plain head (forward + both backward products).

The row step (log-sum-exp, loss, gradient in place) has two backends, in "auto" order: "triton" (CUDA,
bf16/fp16/fp32 logits: `triton_ce.py`, one launch per chunk) and "reference" (`reference.py`, PyTorch ops,
any device and dtype). The loss with its gradients is one custom op (`hyla::linear_ce`), so torch.compile
keeps the chunk loop out of its graph (traced, inductor planned the chunks' buffers so that the compiled
step's peak memory grew).
"""

from __future__ import annotations

import torch

from kernels.ce import reference
from kernels.common import check, check_same_device, check_tensor, pick_backend

try:  # triton is a Linux-only dependency
    from kernels.ce import triton_ce
except ImportError:
    triton_ce = None

__all__ = ["linear_cross_entropy"]

Tensor = torch.Tensor
BACKENDS = {
    "triton": lambda device: device.type == "cuda" and triton_ce is not None,
    "reference": lambda device: True,
}


def _matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype a bf16/fp16 autocast region would give the head matmul, else x's own dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _accumulate_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, summed in acc's dtype by one matmul with beta = 1. A bf16/fp16 product goes into the fp32 acc
    through cuBLAS's fp32 output (`addmm` with out_dtype, CUDA only); on CPU it is formed in its own dtype, then
    added (promoted element by element)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


def _chunked_loss(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_rows: int,
                  dtype: torch.dtype, backend: str, with_grad: bool):  # fmt: skip
    """Sum of the per-row losses over valid rows divided by their count, the head matmul in `dtype`; with_grad
    also returns dx (in `dtype`) and dW (fp32, or fp64 for fp64)."""
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rows_step = triton_ce.xent_rows_ if backend == "triton" else reference.xent_rows_
    xm, wm = x.to(dtype), weight.to(dtype)
    n_valid = (targets != ignore_index).sum()
    scale = 1.0 / n_valid.clamp_min(1).to(acc_dtype)  # d(mean)/d(row loss) of a valid row
    total = torch.zeros((), dtype=acc_dtype, device=x.device)
    dx = torch.empty_like(xm) if with_grad else None
    dw = torch.zeros(weight.shape, dtype=acc_dtype, device=x.device) if with_grad else None
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, x.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = xm[rows] @ wm.t()  # becomes the logits' gradient in place when with_grad
            total += rows_step(logits, targets[rows], ignore_index, scale, with_grad).sum()
            if with_grad:
                torch.mm(logits, wm, out=dx[rows])
                _accumulate_product(dw, logits.t(), xm[rows])
            del logits  # else the next chunk's logits are allocated while this chunk's are still held
    # mean over valid rows: 0 / 0 = nan when every target is ignored, as F.cross_entropy gives
    return total / n_valid, dx, dw


@torch.library.custom_op("hyla::linear_ce", mutates_args=())
def _loss_with_grads(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_rows: int,
                     dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return _chunked_loss(x, weight, targets, ignore_index, chunk_rows, dtype, backend, with_grad=True)


@_loss_with_grads.register_fake
def _(x, weight, targets, ignore_index, chunk_rows, dtype, backend):
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    loss, dw = x.new_empty((), dtype=acc_dtype), weight.new_empty(weight.shape, dtype=acc_dtype)
    return loss, x.new_empty(x.shape, dtype=dtype), dw


def _setup_context(ctx, inputs, output):
    x, weight = inputs[:2]
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.dtypes = (x.dtype, weight.dtype)


def _backward(ctx, grad_loss, *_):
    """The loss is linear in its stored gradients: scale them by the incoming gradient."""
    dx, dw = ctx.saved_tensors
    x_dtype, w_dtype = ctx.dtypes
    return (dx * grad_loss).to(x_dtype), (dw * grad_loss).to(w_dtype), None, None, None, None, None


_loss_with_grads.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -1,
                         chunk_rows: int = 2048, backend: str = "auto") -> Tensor:  # fmt: skip
    """Mean cross-entropy of logits = x @ weight.T against targets, without materializing the logits.

    Args:
        x: [N, dim] hidden states (any float dtype; under autocast the head matmul runs in its dtype).
        weight: [vocab, dim] head (here the tied embedding).
        targets: [N] int64/int32 class ids; rows equal to ignore_index do not count.
        chunk_rows: rows per chunk (peak extra memory ~ chunk_rows x vocab x the matmul dtype's size).
        backend: "auto", "triton" or "reference" (the row step; see the module docstring).

    Returns:
        the scalar mean loss in fp32 (fp64 for fp64 inputs), equal to
        F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index).

    Example:
        >>> x, w = torch.randn(10, 8), torch.randn(50, 8)
        >>> y = torch.randint(0, 50, (10,))
        >>> torch.allclose(linear_cross_entropy(x, w, y), torch.nn.functional.cross_entropy(x @ w.T, y))
        True
    """
    check_tensor("x", x, (None, None))
    check_tensor("weight", weight, (None, x.shape[1]))
    check_tensor("targets", targets, (x.shape[0],), dtypes=(torch.int64, torch.int32))
    check(chunk_rows >= 1, f"chunk_rows must be >= 1, got {chunk_rows}")
    check_same_device(x=x, weight=weight, targets=targets)
    if not torch.compiler.is_compiling():  # one sync, as the model's input check; a bad id would be read out of bounds
        vocab, bad = weight.shape[0], (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        check(not bad.any(), f"targets must be in [0, {vocab}) or equal ignore_index ({ignore_index})")
    targets, dtype = targets.long(), _matmul_dtype(x)
    name = pick_backend(backend, x.device, BACKENDS)
    if name == "triton" and dtype not in triton_ce.SUPPORTED_DTYPES:
        check(backend == "auto", f"backend 'triton' needs a matmul dtype in {triton_ce.SUPPORTED_DTYPES}, got {dtype}")
        name = "reference"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return torch.ops.hyla.linear_ce(x, weight, targets, ignore_index, chunk_rows, dtype, name)[0]
    return _chunked_loss(x, weight, targets, ignore_index, chunk_rows, dtype, name, with_grad=False)[0]
