"""Reference (PyTorch) row step of the chunked linear cross-entropy."""

from __future__ import annotations

import torch

from kernels.common import compute_dtype


def xent_rows_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, scale: torch.Tensor,
               with_grad: bool) -> torch.Tensor:  # fmt: skip
    """Per-row loss lse(z) - z[target] (0 for ignored rows) of logits z [n, vocab], accumulated in fp32
    (fp64 for fp64 logits). with_grad: overwrite the logits in place with their gradient
        dL/dz = (softmax(z) - onehot(target)) * scale        (0 for ignored rows; scale: 0-dim tensor)."""
    acc = compute_dtype(logits)
    z = logits.to(acc)
    lse = torch.logsumexp(z, -1)
    valid = targets != ignore_index
    tgt = targets.clamp_min(0)
    loss = torch.where(valid, lse - z.gather(1, tgt[:, None]).squeeze(1), 0.0)
    if with_grad:
        grad = (z - lse[:, None]).exp_()
        grad[torch.arange(grad.shape[0], device=grad.device), tgt] -= 1.0
        logits.copy_(grad.mul_((valid.to(acc) * scale)[:, None]))
    return loss
