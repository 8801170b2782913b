"""Causal depthwise conv + SiLU (Gated DeltaNet's short convolution): one public function,
`causal_conv1d_silu`, dispatching to a backend.

Backends, in "auto" order: "triton" (CUDA tensors, fp16/bf16/fp32 x, width 4, no `past`: `triton_conv.py`,
one launch forward, one launch plus a partial-sum reduction backward, as torch.library ops) and "reference"
(`reference.py`, any device, differentiable by autograd; also the decoding path with a cached `past`).
"""

from __future__ import annotations

import torch

from kernels.common import check, check_same_device, check_tensor, pick_backend
from kernels.conv.reference import causal_conv1d_silu as reference_causal_conv1d_silu

try:  # triton is a Linux-only dependency
    from kernels.conv.triton_conv import SUPPORTED_DTYPES, TRITON_MAX_CHUNKS, TRITON_WIDTH, triton_causal_conv1d_silu
except ImportError:
    triton_causal_conv1d_silu = None

__all__ = ["causal_conv1d_silu"]

MAX_WIDTH = 8
BACKENDS = {
    "triton": lambda device: device.type == "cuda" and triton_causal_conv1d_silu is not None,
    "reference": lambda device: True,
}


def causal_conv1d_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    past: torch.Tensor | None = None,
    backend: str = "auto",
    chunks: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """y[b, t, c] = silu(sum_i weight[c, i] x~[b, t - W + 1 + i, c]), x~ = concat(past, x) over time.

    Args:
        x: [B, T, C] inputs.
        weight: [C, W] per-channel taps (W <= 8), e.g. `nn.Conv1d(C, C, W, groups=C).weight[:, 0]`.
        past: optional [B, W - 1, C] inputs before x (decoding); None means zeros.
        backend: "auto", "triton" or "reference".
        chunks: if given, y comes back as y.chunk(chunks, -1) (C divisible by chunks). The Triton path
            (chunks <= 3) writes each chunk as its own contiguous tensor: no copy to split them, and their
            gradients are read where they are (no concatenation in the backward).

    Returns:
        [B, T, C] in x's dtype, accumulated in fp32, or a tuple of `chunks` [B, T, C / chunks] tensors.

    Example:
        >>> x, w = torch.randn(2, 10, 6), torch.randn(6, 4)
        >>> causal_conv1d_silu(x, w).shape
        torch.Size([2, 10, 6])
        >>> [c.shape for c in causal_conv1d_silu(x, w, chunks=3)]
        [torch.Size([2, 10, 2]), torch.Size([2, 10, 2]), torch.Size([2, 10, 2])]
    """
    check_tensor("x", x, (None, None, None))
    B, T, C = x.shape
    check(B > 0 and T > 0 and C > 0, f"empty input: x {tuple(x.shape)}")
    check_tensor("weight", weight, (C, None))
    W = weight.shape[1]
    check(0 < W <= MAX_WIDTH, f"conv width must be in [1, {MAX_WIDTH}], got {W}")
    if past is not None:
        check_tensor("past", past, (B, W - 1, C))
    n = 1 if chunks is None else chunks
    check(isinstance(n, int) and n > 0 and C % n == 0, f"chunks must divide the {C} channels, got {chunks}")
    device = check_same_device(x=x, weight=weight, past=past)
    name = pick_backend(backend, device, BACKENDS)
    if name == "triton":
        reason = None if past is None else "no past context (decoding runs the reference)"
        if W != TRITON_WIDTH:
            reason = f"width {TRITON_WIDTH}, got {W}"
        row = x.stride(1) if x.stride(2) == 1 else C  # the row stride the kernels read x with (else a copy's)
        if T * max(row, C) >= 2**31:  # the kernels index one sequence in int32
            reason = f"T * (row stride) < 2^31, got {T} * {max(row, C)}"
        if x.dtype not in SUPPORTED_DTYPES:
            reason = f"x in {SUPPORTED_DTYPES}, got {x.dtype}"
        if n > TRITON_MAX_CHUNKS:
            reason = f"at most {TRITON_MAX_CHUNKS} chunks, got {n}"
        check(reason is None or backend == "auto", f"backend 'triton' needs {reason}")
        if reason is None:
            ys = triton_causal_conv1d_silu(x, weight, n)
            return ys[0] if chunks is None else tuple(ys)
    y = reference_causal_conv1d_silu(x, weight, past)
    return y if chunks is None else y.chunk(n, -1)
