"""Partial rotary position embedding (rotate-half convention on the first `rotary_dim` dims).

inv_freq_i = theta^(-2i / rotary_dim), i < rotary_dim / 2; the cos/sin tables are duplicated to
rotary_dim columns and x[:rotary_dim] -> x[:rotary_dim] * cos + rotate_half(x[:rotary_dim]) * sin,
with rotate_half(x) = cat(-x2, x1) for x = [x1 | x2]; dims past rotary_dim pass through. In fp32.
"""

from __future__ import annotations

import torch

from kernels.common import compute_dtype


def rope_tables(
    positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [len(positions), rotary_dim] for integer `positions`."""
    dims = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=positions.device)  # no host copy
    angles = positions.to(torch.float64)[:, None] * (theta ** -(dims / rotary_dim))[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, H, D] with tables [T, rotary_dim]; computed in fp32 (fp64 for fp64 x)."""
    r = cos.shape[-1]
    dt = compute_dtype(x)
    xr = x[..., :r].to(dt)
    x1, x2 = xr.chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(dt), sin[:, None, :].to(dt)  # broadcast over heads
    rotated = xr * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), x[..., r:]], dim=-1)
