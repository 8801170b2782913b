"""Muon for hidden weight matrices, AdamW for the rest, and the warmup + cosine schedule.

Parameter split (`split_params`):
- Muon: every 2-D weight of the blocks (attention, CSA, GDN projections, FFN).
- AdamW: the tied embedding/head, norms, hyper-connection scales, A_log, dt_bias, and the GDN's
  depthwise conv weight [C, 1, 4]. The conv is not a linear map between feature spaces but C
  independent 4-tap filters, one per channel; orthogonalizing the [C, 4] matrix across channels
  (what the original did) couples filters that share nothing, so it is trained like other per-channel
  parameters. Weight decay applies to AdamW's matrices (embedding, conv), not to gains and scalars.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn as nn

from kernels.ns import muon_update_


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(muon, adamw_decay, adamw_no_decay) parameters, each in the model's order."""
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and "embedding" not in name:
            muon.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    return muon, decay, no_decay


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, batched by shape.

    Per matrix W with gradient G (Nesterov momentum mu, buffer M):
        M <- mu M + G;   U <- G + mu M;   O <- NS5(U);
        W <- (1 - lr wd) W - lr * max(1, rows / cols) ** 0.5 * O
    The scale keeps the update's RMS per entry comparable across shapes (NS gives unit singular values;
    a tall matrix spreads them over more rows). The parameters are grouped by shape (one scale per
    group); all groups' matrices go through one `kernels.ns.muon_update_` call (on CUDA: momentum,
    Newton-Schulz and the update fused into one grouped set of Triton launches). `ns_steps` applies
    to the whole optimizer.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.01,
        ns_steps: int = 5,
    ):
        params = list(params)
        if any(p.dim() != 2 for p in params):
            raise ValueError("Muon takes 2-D parameters only")
        by_shape = defaultdict(list)
        for p in params:
            by_shape[tuple(p.shape)].append(p)
        groups = [{"params": ps} for ps in by_shape.values()]
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        params, grads, bufs, mus, nesterov, decay, alpha = [], [], [], [], [], [], []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            for p in ps:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            rows, cols = ps[0].shape
            lr, n = group["lr"], len(ps)
            params += ps
            grads += [p.grad for p in ps]
            bufs += [self.state[p]["momentum_buffer"] for p in ps]
            mus += [group["momentum"]] * n
            nesterov += [group["nesterov"]] * n
            decay += [1 - lr * group["weight_decay"]] * n
            alpha += [lr * max(1.0, rows / cols) ** 0.5] * n
        if params:  # every shape group in one call: on CUDA one fused set of Triton launches
            muon_update_(params, grads, bufs, mus, nesterov, decay, alpha, steps=self.defaults["ns_steps"])


def build_optimizers(
    model: nn.Module,
    muon_lr: float = 0.02,
    adamw_lr: float = 0.002,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.99),
) -> list[torch.optim.Optimizer]:
    """[Muon, AdamW], each group remembering its own base LR in group['base_lr']."""
    muon_params, decay, no_decay = split_params(model)
    fused = all(p.is_cuda for p in decay + no_decay)
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=adamw_lr,
        betas=betas,
        fused=fused or None,
    )
    optimizers = [Muon(muon_params, lr=muon_lr, weight_decay=weight_decay), adamw]
    for opt in optimizers:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return optimizers


def lr_multiplier(step: int, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to 0 at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * multiplier
