"""Newton-Schulz orthogonalization for Muon: `newton_schulz` dispatching to a backend.

Backends, in "auto" order: "reference" (`reference.py`, any device). The iteration is documented in
`reference.py` and kept by every backend.
"""

from __future__ import annotations

import torch

from kernels.common import check, check_tensor, pick_backend
from kernels.ns import reference
from kernels.ns.reference import NS_COEFFS

__all__ = ["newton_schulz", "NS_COEFFS"]

BACKENDS = {"reference": lambda device: True}


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coeffs: tuple[float, float, float] = NS_COEFFS,
    backend: str = "auto",
) -> torch.Tensor:
    """Orthogonalize G [m, n] or a stack [N, m, n] of same-shape matrices (Muon's update direction).

    Returns a tensor of G's shape and dtype whose singular values lie near 1 (about [0.7, 1.2]).

    Example:
        >>> X = newton_schulz(torch.randn(4, 576, 1536))
        >>> X.shape
        torch.Size([4, 576, 1536])
    """
    check(isinstance(G, torch.Tensor), f"G must be a torch.Tensor, got {type(G).__name__}")
    check(G.dim() in (2, 3), f"G must be [m, n] or [N, m, n], got shape {tuple(G.shape)}")
    check_tensor("G", G, (None,) * G.dim())
    check(G.numel() > 0, f"G is empty: shape {tuple(G.shape)}")
    check(steps >= 0, f"steps must be >= 0, got {steps}")
    check(bool(torch.isfinite(G).all()), "G has non-finite entries (NaN or inf)")
    pick_backend(backend, G.device, BACKENDS)
    return reference.newton_schulz(G, steps, coeffs)
