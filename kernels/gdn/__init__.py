"""Gated delta rule: one public function, `gated_delta_rule`, dispatching to a backend.

Backends, in "auto" order: "triton" (CUDA tensors, when Triton is installed: `triton_op.py`, kernels in
`triton_fwd.py` / `triton_bwd.py`; "auto" takes it for bf16 and fp32 inputs, see `unsupported_reason`)
and "reference" (the chunked PyTorch form in `reference.py`, any device, differentiable by autograd).
The recurrence and the layout are documented in `reference.py` and kept by every backend.
"""

from __future__ import annotations

import torch

from kernels.common import (
    FLOAT_DTYPES,
    check,
    check_same_device,
    check_tensor,
    compute_dtype,
    pick_backend,
)
from kernels.gdn.reference import chunk_gated_delta_rule, recurrent_gated_delta_rule

__all__ = ["gated_delta_rule", "chunk_gated_delta_rule", "recurrent_gated_delta_rule", "l2norm"]

MAX_HEAD_DIM = 256

try:
    from kernels.gdn.triton_op import triton_gated_delta_rule, unsupported_reason
except ImportError:  # no Triton on this machine
    triton_gated_delta_rule = None

BACKENDS = {
    "triton": lambda device: triton_gated_delta_rule is not None and device.type == "cuda",
    "reference": lambda device: True,
}


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in fp32 (eps inside the root)."""
    xf = x.to(compute_dtype(x))
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule, S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T.

    Args:
        q, k: [B, T, H, K] queries and keys (K <= 256).
        v: [B, T, H, V] values.
        g: [B, T, H] log-space decay per step (<= 0), kept in fp32 by the caller.
        beta: [B, T, H] write strength in (0, 1).
        scale: query scale, default K ** -0.5.
        initial_state: optional [B, H, K, V] state entering the sequence.
        output_final_state: also return the [B, H, K, V] fp32 state after the last step.
        use_qk_l2norm: L2-normalize q and k per head first (`l2norm`); the Triton backend does it inside its
            kernels and saves the raw q and k for the backward.
        backend: "auto", "triton" or "reference".

    Returns:
        (o [B, T, H, V] in v's dtype, final state or None).

    Example:
        >>> B, T, H, K = 2, 100, 3, 112
        >>> q, k, v = (torch.randn(B, T, H, K) for _ in range(3))
        >>> g, beta = -torch.rand(B, T, H), torch.rand(B, T, H)
        >>> o, S = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, output_final_state=True)
        >>> o.shape, S.shape
        (torch.Size([2, 100, 3, 112]), torch.Size([2, 3, 112, 112]))
    """
    if not _well_formed(q, k, v, g, beta, initial_state):
        _validate(q, k, v, g, beta, initial_state)  # raises the precise ValueError
    name = pick_backend(backend, q.device, BACKENDS)
    if name == "triton":
        reason = unsupported_reason(q, k, v)
        check(reason is None or backend == "auto", f"backend 'triton' needs {reason}")
        if reason is None:
            scale = q.shape[3] ** -0.5 if scale is None else scale
            return triton_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)


def _well_formed(q, k, v, g, beta, initial_state) -> bool:
    """Every condition of `_validate` in one cheap expression (`_validate`'s checks cost tens of microseconds
    of host time per call, which at small batches is the op's time)."""
    fp, h0 = FLOAT_DTYPES, initial_state
    if not (
        isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
        and isinstance(g, torch.Tensor) and isinstance(beta, torch.Tensor) and q.dim() == 4 and v.dim() == 4
    ):  # fmt: skip
        return False
    B, T, H, K = shape = q.shape
    V = v.shape[3]
    return (
        B > 0 and T > 0 and H > 0 and 0 < K <= MAX_HEAD_DIM and 0 < V <= MAX_HEAD_DIM
        and k.shape == shape and v.shape[:3] == shape[:3] and g.shape == shape[:3] and beta.shape == shape[:3]
        and q.dtype in fp and k.dtype in fp and v.dtype in fp and g.dtype in fp and beta.dtype in fp
        and q.device == k.device == v.device == g.device == beta.device
        and (h0 is None or (isinstance(h0, torch.Tensor) and h0.dtype in fp and h0.shape == (B, H, K, V)
                            and h0.device == q.device))
    )  # fmt: skip


def _validate(q, k, v, g, beta, initial_state) -> None:
    """Raise a ValueError naming the first bad input."""
    check_tensor("q", q, (None, None, None, None))
    B, T, H, K = q.shape
    check_tensor("k", k, (B, T, H, K))
    check_tensor("v", v, (B, T, H, None))
    V = v.shape[-1]
    check_tensor("g", g, (B, T, H))
    check_tensor("beta", beta, (B, T, H))
    check(
        0 < K <= MAX_HEAD_DIM and 0 < V <= MAX_HEAD_DIM,
        f"head dims must be in [1, {MAX_HEAD_DIM}], got K={K}, V={V}",
    )
    check(T > 0 and B > 0 and H > 0, f"empty input: B={B}, T={T}, H={H}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, (B, H, K, V))
    check_same_device(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
