"""Newton-Schulz reference: singular values pushed near 1, stack = loop, orientation, bad input."""

import pytest
import torch
from helpers import relerr

from kernels.ns import newton_schulz


def svals(X):
    return torch.linalg.svdvals(X.double())


@pytest.mark.parametrize("shape", [(64, 96), (48, 160), (160, 48), (9, 576), (3024, 4)])
def test_singular_values_random(shape):
    """Non-square Gaussian matrices: their smallest singular value is bounded away from 0."""
    X = newton_schulz(torch.randn(*shape, generator=torch.Generator().manual_seed(0)))
    s = svals(X)
    assert s.min() > 0.6 and s.max() < 1.25


def test_singular_values_low_rank_and_ill_conditioned():
    gen = torch.Generator().manual_seed(1)
    low_rank = torch.randn(96, 8, generator=gen) @ torch.randn(8, 128, generator=gen)
    s = svals(newton_schulz(low_rank))
    assert s[:8].min() > 0.6 and s[:8].max() < 1.25  # the 8 directions present are orthogonalized
    assert s[8:].max() < 1e-3  # absent directions stay absent
    U, _, Vh = torch.linalg.svd(torch.randn(64, 64, generator=gen))
    ill = U @ torch.diag(torch.logspace(0, -3, 64)) @ Vh  # condition number 1e3
    s = svals(newton_schulz(ill))
    assert s.max() < 1.25 and s[:32].min() > 0.6  # the well-scaled half converges in 5 steps


def test_keeps_singular_vectors():
    """NS(G) ~ U V^T: it commutes with the polar factor, so U^T NS(G) V is diagonal."""
    G = torch.randn(40, 70, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.T @ newton_schulz(G) @ Vh.T
    off = D - torch.diag(torch.diagonal(D))
    assert off.abs().max() < 1e-12


def test_stack_equals_loop_and_tall_is_transposed_wide():
    G = torch.randn(5, 30, 50, generator=torch.Generator().manual_seed(3))
    stacked = newton_schulz(G)
    assert torch.allclose(stacked, torch.stack([newton_schulz(g) for g in G]), atol=1e-6)
    assert relerr(newton_schulz(G.mT), stacked.mT) < 1e-6
    assert newton_schulz(G.double()).dtype == torch.float64
    assert newton_schulz(G.bfloat16()).dtype == torch.bfloat16


def test_zero_steps_is_normalization():
    G = torch.randn(8, 12, dtype=torch.float64)
    assert relerr(newton_schulz(G, steps=0), G / G.norm()) < 1e-6


@pytest.mark.parametrize(
    "G,match",
    [
        (torch.randn(10), r"\[m, n\] or \[N, m, n\]"),
        (torch.randn(0, 4), "empty"),
        (torch.tensor([[1.0, float("nan")]]), "non-finite"),
        (torch.ones(3, 3, dtype=torch.int64), "dtype"),
    ],
)
def test_rejects_bad_input(G, match):
    with pytest.raises(ValueError, match=match):
        newton_schulz(G)
