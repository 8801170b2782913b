"""Reference causal depthwise conv + SiLU (the Gated DeltaNet short convolution), in PyTorch.

    y[b, t, c] = silu( sum_{i < W} w[c, i] * x~[b, t - (W - 1) + i, c] ),   x~ = concat(past, x) over t

with `past` the W - 1 inputs before x (zeros at the start of a sequence). Computed in fp32 (fp64 for
fp64 inputs) on the [B, T, C] layout, returned in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.common import compute_dtype


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, T, C], weight [C, W], past [B, W - 1, C] or None (zeros) -> [B, T, C] in x's dtype."""
    B, T, C = x.shape
    W = weight.shape[1]
    past = x.new_zeros(B, W - 1, C) if past is None else past.to(x.dtype)
    xp = torch.cat([past, x], 1).to(compute_dtype(x))
    w = weight.to(xp.dtype)
    y = sum(xp[:, i : i + T] * w[:, i] for i in range(W))
    return F.silu(y).to(x.dtype)
