"""PyTorch reference for the Newton-Schulz orthogonalization used by Muon.

For G [m, n] (or a stack [N, m, n]): X_0 = G / (||G||_F + eps), working on the wide orientation
(a tall matrix is transposed first and back at the end, so A below is min(m, n) square), then
`steps` times the quintic iteration

    A = X X^T;   B = b A + c A^2;   X = a X + B X,       (a, b, c) = (3.4445, -4.7750, 2.0315)

which drives every singular value of X towards ~1 (into about [0.7, 1.2]) while keeping the singular
vectors: X ~ U V^T for G = U S V^T. Computed in fp32, or fp64 for fp64 input; returned in G's dtype.
"""

from __future__ import annotations

import torch

from kernels.common import compute_dtype

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    G: torch.Tensor, steps: int = 5, coeffs: tuple[float, float, float] = NS_COEFFS, eps: float = 1e-7
) -> torch.Tensor:
    """Quintic Newton-Schulz iteration on a matrix [m, n] or a stack [N, m, n]; see the module doc."""
    a, b, c = coeffs
    dt = compute_dtype(G)
    X = G.to(dt)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)
