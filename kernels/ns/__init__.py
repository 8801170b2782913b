"""Newton-Schulz orthogonalization for Muon: `newton_schulz` (one stack) and `newton_schulz_many` (all
of an optimizer's shape groups at once), dispatching to a backend.

Backends (the iteration is documented in `reference.py` and kept by every backend):
- "triton" (`triton_ns.py`, CUDA): bf16 operands, fp32 accumulation, 3 launches a step for any number
  of matrices of any shapes plus a prep launch, replayed as a CUDA graph (the normalization fused into
  the prep and step 0, the output written by the last launch). Wide matrices (n >= 2.5 m, m >= 256) run
  the same iteration in its Gram form (steps on [m, m] matrices, X touched once every 2 steps: 15-26%
  fewer FLOPs for the 95m model's 576 x 1536 and 576 x 3024), the other matrices the plain one, and
  stacks with a side <= 8 use fp32 operands; each of these sets on its own stream, all in one CUDA
  graph (see `triton_ns`). On an H100 (sm_90) the Gram form's [m, m] products run in a warp-specialized
  Gluon kernel (`gluon_products.py`).
- "cuda" (`cuda.py` + `csrc/ns/ns.cu`, CUDA with CuPy installed): the same three stages as CUDA C++
  mma.sync kernels compiled by NVRTC, one launch a stage per stack (stacks with a side <= 8, whose
  bf16 error would exceed 2e-2, take the fp32 reference instead: their cost is negligible).
- "reference" (`reference.py`, any device, fp32 math).
`muon_update_` is Muon's whole update (momentum, Nesterov, Newton-Schulz, weight decay, step) for a list
of matrices; on CUDA the momentum fuses into the Triton prep launch and the update into the last one.

"auto" picks, on CUDA, the backend measured fastest for the stack's wide shape in `AUTO_TABLE`
(recorded by `bench/ns.py` on an H100, see profiles/ns.md; "triton" for shapes not listed), else
"reference".

`coeffs` is one (a, b, c) used at every step (default `NS_COEFFS`) or a schedule with one (a, b, c)
per step, such as `polar_express(steps)` (per-step minimax-optimal quintics, derived here by Remez
exchange following Amsel et al. 2025, "The Polar Express"); the default is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from kernels.common import FLOAT_DTYPES, check, check_tensor, compute_dtype, pick_backend
from kernels.ns import cuda, reference
from kernels.ns.reference import NS_COEFFS

try:  # triton is a Linux-only dependency
    from kernels.ns import triton_ns
except ImportError:
    triton_ns = None

__all__ = ["newton_schulz", "newton_schulz_many", "muon_update_", "polar_express", "NS_COEFFS", "AUTO_TABLE"]

BACKENDS = {
    "triton": lambda device: device.type == "cuda" and triton_ns is not None,
    "cuda": cuda.available,
    "reference": lambda device: True,
}

# wide shape (min(m, n), max(m, n)) -> fastest backend for one stack of the 95m model's count, measured by
# bench/ns.py on an H100 (run 24 of 2026-11-24, profiles/ns.json "per_wide_shape"); shapes not listed: "triton"
AUTO_TABLE: dict[tuple[int, int], str] = {
    (576, 3024): "triton",  # triton 0.359 ms, cuda 1.295 ms (x8)
    (576, 1008): "triton",  # triton 0.369 ms, cuda 1.008 ms (x16)
    (9, 576): "triton",  # triton 0.125 ms, cuda 0.712 ms (x16)
    (4, 3024): "triton",  # triton 0.241 ms, cuda 0.770 ms (x8)
    (576, 1536): "triton",  # triton 1.129 ms, cuda 3.878 ms (x48)
    (576, 1152): "triton",  # triton 0.233 ms, cuda 1.381 ms (x8)
    (192, 576): "triton",  # triton 0.141 ms, cuda 1.205 ms (x16)
    (576, 576): "triton",  # triton 0.237 ms, cuda 1.293 ms (x12)
    (192, 192): "triton",  # triton 0.236 ms, cuda 1.209 ms (x8)
}

Coeffs = tuple[float, float, float] | Sequence[tuple[float, float, float]]


def _minimax_quintic(lo: float, hi: float) -> tuple[float, float, float, float]:
    """Odd quintic p(x) = a x + b x^3 + c x^5 minimizing max |1 - p| on [lo, hi], and that max (Remez).

    The optimum equioscillates on 4 points {lo, x1, x2, hi}: 1 - p(x_i) = (-1)^i E. Solve the 4 x 4
    linear system for (a, b, c, E), move x1, x2 to the interior extrema of p (roots of
    p'(x) = a + 3 b x^2 + 5 c x^4, a quadratic in x^2), repeat until they stop moving.
    """
    x = (lo + hi) / 2 - (hi - lo) / 2 * np.cos(np.pi * np.arange(4) / 3)  # Chebyshev start
    for _ in range(100):
        M = np.stack([x, x**3, x**5, (-1.0) ** np.arange(4)], axis=1)
        a, b, c, E = np.linalg.solve(M, np.ones(4))
        s = np.roots([5 * c, 3 * b, a])
        r = np.sort([np.sqrt(v.real) for v in s if abs(v.imag) < 1e-12 and lo**2 < v.real < hi**2])
        if len(r) != 2 or np.allclose(r, x[1:3], rtol=1e-14, atol=0):
            break
        x = np.array([lo, r[0], r[1], hi])
    return float(a), float(b), float(c), float(abs(E))


@lru_cache(maxsize=16)
def polar_express(steps: int = 5, lo: float = 1e-3, safety: float = 1.01) -> tuple[tuple[float, float, float], ...]:
    """A per-step coefficient schedule: step t uses the minimax quintic for the interval [l_t, u_t] that
    the singular values (after Frobenius normalization: in (0, 1]) can occupy, starting from [lo, 1];
    then [l_{t+1}, u_{t+1}] is the range of p_t on [l_t, u_t] (about [1 - E_t, 1 + E_t]). All steps but the
    last are applied to x / safety, so that rounding cannot push values past the interval where p is
    designed. Pass it as `coeffs`.

    Example:
        >>> X = newton_schulz(torch.randn(64, 128), steps=5, coeffs=polar_express(5))
    """
    out, l, u = [], lo, 1.0
    for t in range(steps):
        a, b, c, E = _minimax_quintic(l, u)
        f = safety if t < steps - 1 else 1.0
        a, b, c = a / f, b / f**3, c / f**5
        out.append((a, b, c))
        x = np.linspace(l, u, 20001)
        y = a * x + b * x**3 + c * x**5
        l, u = float(y.min()), float(y.max())
    return tuple(out)


def _schedule(coeffs: Coeffs, steps: int) -> list[tuple[float, float, float]]:
    check(len(coeffs) > 0, "coeffs is empty")
    if isinstance(coeffs[0], (int, float)):
        check(len(coeffs) == 3, f"coeffs must be (a, b, c) or a list of them, got {coeffs}")
        return [tuple(float(c) for c in coeffs)] * steps
    check(all(len(c) == 3 for c in coeffs), f"every step's coeffs must be (a, b, c), got {coeffs}")
    check(len(coeffs) == steps, f"a schedule of {len(coeffs)} steps was given for steps={steps}")
    return [tuple(float(x) for x in c) for c in coeffs]


def _check_input(G: torch.Tensor, check_finite: bool) -> None:
    ok = isinstance(G, torch.Tensor) and G.dim() in (2, 3) and G.dtype in FLOAT_DTYPES and G.numel() > 0
    if not ok:  # the checks that say what is wrong (formatting them for every matrix of Muon costs ~10 us)
        check(isinstance(G, torch.Tensor), f"G must be a torch.Tensor, got {type(G).__name__}")
        check(G.dim() in (2, 3), f"G must be [m, n] or [N, m, n], got shape {tuple(G.shape)}")
        check_tensor("G", G, (None,) * G.dim())
        check(G.numel() > 0, f"G is empty: shape {tuple(G.shape)}")
    if check_finite:  # one device sync
        check(bool(torch.isfinite(G).all()), "G has non-finite entries (NaN or inf)")


def _reference(G: torch.Tensor, schedule: list[tuple[float, float, float]], eps: float) -> torch.Tensor:
    if len(set(schedule)) <= 1:
        return reference.newton_schulz(G, len(schedule), schedule[0] if schedule else NS_COEFFS, eps)
    dt = compute_dtype(G)
    X = reference.newton_schulz(G.to(dt), 0, NS_COEFFS, eps)  # normalized
    tall = X.shape[-2] > X.shape[-1]
    X = X.mT if tall else X
    for a, b, c in schedule:  # the reference iteration with per-step coefficients
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


def _resolve(backend: str, G: torch.Tensor) -> str:
    if backend == "auto" and G.device.type == "cuda" and os.environ.get("HYLA_BACKEND", "auto") == "auto":
        wide = tuple(sorted(G.shape[-2:]))
        choice = AUTO_TABLE.get(wide, "triton")
        if BACKENDS[choice](G.device):
            return choice
    return pick_backend(backend, G.device, BACKENDS)


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coeffs: Coeffs = NS_COEFFS,
    backend: str = "auto",
    eps: float = 1e-7,
    check_finite: bool = True,
) -> torch.Tensor:
    """Orthogonalize G [m, n] or a stack [N, m, n] of same-shape matrices (Muon's update direction).

    Returns a tensor of G's shape and dtype whose singular values lie near 1 (about [0.7, 1.2]).
    The kernel backends use bf16 operands with fp32 accumulation. `check_finite=False` skips the
    NaN/inf check (it costs a device sync); non-finite input then gives non-finite output.

    Example:
        >>> X = newton_schulz(torch.randn(4, 576, 1536))
        >>> X.shape
        torch.Size([4, 576, 1536])
    """
    _check_input(G, check_finite)
    check(steps >= 0, f"steps must be >= 0, got {steps}")
    schedule = _schedule(coeffs, steps)
    name = _resolve(backend, G)
    if name == "reference" or steps == 0 or (name == "cuda" and min(G.shape[-2:]) <= cuda.TINY):
        return _reference(G, schedule, eps)  # the CUDA kernels are bf16-only: tiny sides go to fp32
    if name == "cuda":
        return cuda.newton_schulz_cuda(G, schedule, eps)
    return triton_ns.newton_schulz_triton([G], schedule, eps)[0]


def newton_schulz_many(
    Gs: Sequence[torch.Tensor],
    steps: int = 5,
    coeffs: Coeffs = NS_COEFFS,
    backend: str = "auto",
    eps: float = 1e-7,
    check_finite: bool = True,
) -> list[torch.Tensor]:
    """`newton_schulz` on each of several matrices/stacks of any shapes (one dtype and device).

    With the "triton" backend (what "auto" picks on CUDA) every matrix of every stack goes through the
    same 16-18 launches for 5 steps (per set, see the module doc), whatever the number of shape groups.

    Example:
        >>> Xs = newton_schulz_many([torch.randn(48, 576, 1536), torch.randn(8, 3024, 576)])
        >>> [tuple(X.shape) for X in Xs]
        [(48, 576, 1536), (8, 3024, 576)]
    """
    check(len(Gs) > 0, "Gs is empty")
    for G in Gs:
        _check_input(G, check_finite)
    check(len({(G.dtype, G.device) for G in Gs}) == 1, "all of Gs must share one dtype and one device")
    check(steps >= 0, f"steps must be >= 0, got {steps}")
    schedule = _schedule(coeffs, steps)
    name = pick_backend(backend, Gs[0].device, BACKENDS)  # "auto" on CUDA: triton, all shapes at once
    if name == "triton" and steps > 0:
        return triton_ns.newton_schulz_triton(list(Gs), schedule, eps)
    return [newton_schulz(G, steps, coeffs, name, eps, check_finite=False) for G in Gs]


def muon_update_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    bufs: Sequence[torch.Tensor],
    momentum: Sequence[float],
    nesterov: Sequence[bool],
    decay: Sequence[float],
    alpha: Sequence[float],
    steps: int = 5,
    coeffs: Coeffs = NS_COEFFS,
    backend: str = "auto",
    eps: float = 1e-7,
) -> None:
    """Muon's update of 2-D matrices, in place: for each matrix W_k with gradient G_k and momentum buffer M_k,
    with per-matrix scalars mu_k = momentum[k], decay[k], alpha[k] (e.g. 1 - lr wd and lr * shape scale):

        M_k <- mu_k M_k + G_k;   U_k <- G_k + mu_k M_k if nesterov[k] else M_k;
        W_k <- decay[k] W_k - alpha[k] NS(U_k)            (NS: `newton_schulz` with `steps`, `coeffs`)

    With the "triton" backend ("auto" on CUDA) and tensors it can address in place (contiguous, rows of a
    multiple of 16 elements, aligned starts: `triton_ns.muon_addresses`), this is one grouped call of
    ~1 + 3 * steps launches per set (graph-replayed): the momentum update is fused into the prep launch and the
    weight update into the last one. Otherwise: torch `_foreach` ops around `newton_schulz_many`.
    Non-finite gradients are not checked for (they give non-finite weights).

    Example:
        >>> W, G, M = torch.randn(576, 1536), torch.randn(576, 1536), torch.zeros(576, 1536)
        >>> muon_update_([W], [G], [M], [0.95], [True], [1 - 0.02 * 0.01], [0.02])
    """
    K = len(params)
    check(K > 0, "params is empty")
    check(
        all(len(x) == K for x in (grads, bufs, momentum, nesterov, decay, alpha)),
        "params, grads, bufs, momentum, nesterov, decay and alpha must have one entry per matrix",
    )
    shapes = [p.shape for p in params]
    if not all(len(s) == 2 and g.shape == s == b.shape for s, g, b in zip(shapes, grads, bufs, strict=True)):
        for s, g, b in zip(shapes, grads, bufs, strict=True):  # (messages formatted only on failure: ~130 matrices)
            check(len(s) == 2, f"params must be 2-D matrices, got shape {tuple(s)}")
            check(g.shape == s == b.shape, f"grad {tuple(g.shape)} and buffer {tuple(b.shape)} must match "
                  f"param {tuple(s)}")  # fmt: skip
    check(steps > 0, f"steps must be > 0, got {steps}")
    schedule = _schedule(coeffs, steps)
    name = pick_backend(backend, params[0].device, BACKENDS)
    if name == "triton":
        addresses = tuple(triton_ns.muon_addresses(list(ts)) for ts in (grads, bufs, params))
        if all(a is not None for a in addresses):
            hyper = np.array([momentum, nesterov, decay, alpha], dtype=np.float32).T
            dtypes = (grads[0].dtype, bufs[0].dtype, params[0].dtype)
            triton_ns.muon_update_triton(list(params), addresses, dtypes, hyper, schedule, eps)
            return
    mus = list(momentum)
    torch._foreach_mul_(bufs, mus)
    torch._foreach_add_(bufs, grads)
    ahead = torch._foreach_add(grads, torch._foreach_mul(bufs, mus))
    updates = [u if n else b for u, b, n in zip(ahead, bufs, nesterov, strict=True)]
    orthos = newton_schulz_many(updates, steps, schedule, name, eps, check_finite=False)
    torch._foreach_mul_(params, list(decay))
    torch._foreach_add_(params, torch._foreach_mul(orthos, [-a for a in alpha]))
