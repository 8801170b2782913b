"""Cross-entropy of a linear head, computed over row chunks so the [N, vocab] logits never exist whole.

With a 32K vocabulary the logits of one 32 x 1024 batch are 1.0e9 values: 2 GiB in bf16, 4 GiB each for
the fp32 copy, the log-softmax and its gradient. `linear_cross_entropy` computes, per chunk of rows,
logits -> log-sum-exp -> loss, and when a gradient is needed the chunk's logit gradient
    dL/dlogits = (softmax(logits) - onehot(target)) / n_valid
right away, folding it into dx (rows of the chunk) and dW (accumulated in fp32). The backward only scales
the stored dx, dW by the incoming gradient. Peak extra memory is one chunk of logits instead of four
full-size buffers; the FLOPs are those of the plain head (forward + both backward products).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype a bf16/fp16 autocast region would give the head matmul, else x's own dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _chunked_loss(
    x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_rows: int, dtype: torch.dtype, with_grad: bool
):
    """Sum of the per-row losses over valid rows divided by their count, the head matmul in `dtype`; with_grad
    also returns dx (in `dtype`) and dW (fp32, or fp64 for fp64)."""
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xm, wm = x.to(dtype), weight.to(dtype)
    valid = targets != ignore_index
    n_valid = valid.sum()
    total = torch.zeros((), dtype=acc_dtype, device=x.device)
    dx = torch.empty_like(xm) if with_grad else None
    dw = torch.zeros(weight.shape, dtype=acc_dtype, device=x.device) if with_grad else None
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, x.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (xm[rows] @ wm.t()).to(acc_dtype)
            lse = torch.logsumexp(logits, -1)
            tgt, ok = targets[rows].clamp_min(0), valid[rows]
            picked = logits.gather(1, tgt[:, None]).squeeze(1)
            total += torch.where(ok, lse - picked, 0.0).sum()
            if with_grad:  # softmax - onehot, in place over the logits; zero for ignored rows
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(grad.shape[0], device=x.device), tgt] -= 1.0
                grad = grad.mul_((ok.to(acc_dtype) / n_valid.clamp_min(1))[:, None]).to(dtype)
                dx[rows] = grad @ wm
                dw += (grad.t() @ xm[rows]).to(acc_dtype)
    # mean over valid rows: 0 / 0 = nan when every target is ignored, as F.cross_entropy gives
    return total / n_valid, dx, dw


# The loss with its gradients as one opaque op: torch.compile keeps the chunk loop out of the graph (traced,
# inductor planned the chunks' buffers so that the compiled step's peak memory grew instead of shrinking).
@torch.library.custom_op("hyla::linear_ce", mutates_args=())
def _loss_with_grads(
    x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_rows: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    return _chunked_loss(x, weight, targets, ignore_index, chunk_rows, dtype, with_grad=True)


@_loss_with_grads.register_fake
def _(x, weight, targets, ignore_index, chunk_rows, dtype):
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
    return (dx * grad_loss).to(x_dtype), (dw * grad_loss).to(w_dtype), None, None, None, None


_loss_with_grads.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -1, chunk_rows: int = 4096
) -> Tensor:
    """Mean cross-entropy of logits = x @ weight.T against targets, without materializing the logits.

    Args:
        x: [N, dim] hidden states (any float dtype; under autocast the head matmul runs in its dtype).
        weight: [vocab, dim] head (here the tied embedding).
        targets: [N] int64 class ids; rows equal to ignore_index do not count.
        chunk_rows: rows per chunk (peak extra memory ~ chunk_rows x vocab x 4 bytes x 3).

    Returns:
        the scalar mean loss in fp32 (fp64 for fp64 inputs), equal to
        F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index).

    Example:
        >>> x, w = torch.randn(10, 8), torch.randn(50, 8)
        >>> y = torch.randint(0, 50, (10,))
        >>> torch.allclose(linear_cross_entropy(x, w, y), torch.nn.functional.cross_entropy(x @ w.T, y))
        True
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"need x [N, dim] and weight [vocab, dim], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if targets.shape != x.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64/int32 [{x.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    targets, dtype = targets.long(), _matmul_dtype(x)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return torch.ops.hyla.linear_ce(x, weight, targets, ignore_index, chunk_rows, dtype)[0]
    return _chunked_loss(x, weight, targets, ignore_index, chunk_rows, dtype, with_grad=False)[0]
