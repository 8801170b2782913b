"""Compressed sparse attention: `csa_attention` (the attention core) and `compress_kv` (compressor).

Backends, in "auto" order:
- "triton" (CUDA; fp16/bf16/fp32, head dim 16/32/64/128):
  `triton_csa.py`: one fused forward and a two-launch backward, as torch.library ops (differentiable,
  torch.compile(fullgraph=True) friendly) and, in eager, a C++ autograd node (`node.py`, which launches the
  same kernels without Python; built on first use); `triton_compress.py`: the compressor in one launch forward
  and one launch plus one batched matmul backward (eager only: under torch.compile the PyTorch
  compressor is traced, which inductor fuses).
- "reference" (`reference.py`, any device, differentiable by autograd).
The math and the layout are documented in `reference.py` and kept by every backend. Token-by-token
decoding lives in `decode.py` (`CSADecodeState`).
"""

from __future__ import annotations

import torch

from kernels.common import FLOAT_DTYPES, check, check_same_device, check_tensor, pick_backend
from kernels.csa import reference
from kernels.csa.decode import CSADecodeState

try:  # triton is a Linux-only dependency
    from kernels.csa import triton_compress, triton_csa
except ImportError:
    triton_compress = triton_csa = None

__all__ = ["csa_attention", "compress_kv", "CSADecodeState"]

BACKENDS = {
    "triton": lambda device: device.type == "cuda" and triton_csa is not None,
    "reference": lambda device: True,
}


def csa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    blend: torch.Tensor,
    window: int = 64,
    stride: int = 4,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """blend * attn(q, kc, vc; t sees block j iff t >= stride (j+1)) + (1 - blend) * attn(q, k, v; window).

    Args:
        q: [B, T, H, D] queries (normed, RoPE'd).
        k, v: [B, T, Hkv, D] keys (normed, RoPE'd) and values; H must be a multiple of Hkv.
        kc, vc: [B, ceil(T / stride), Hkv, D] compressed keys (RoPE'd at stride j + stride // 2) and values.
        blend: [B, T, H * D] per-channel gate in [0, 1] (after the sigmoid).
        window: local window; query t sees keys t - window + 1 .. t.
        stride: compression stride.
        scale: softmax scale, default D ** -0.5.
        backend: "auto", "triton" or "reference".

    Returns:
        [B, T, H, D] in q's dtype.

    Example:
        >>> B, T, H, Hkv, D = 1, 10, 9, 3, 64
        >>> q, blend = torch.randn(B, T, H, D), torch.rand(B, T, H * D)
        >>> k, v = torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
        >>> kc, vc = torch.randn(B, 3, Hkv, D), torch.randn(B, 3, Hkv, D)
        >>> csa_attention(q, k, v, kc, vc, blend).shape
        torch.Size([1, 10, 9, 64])
    """
    if not _well_formed(q, k, v, kc, vc, blend, window, stride):
        _validate(q, k, v, kc, vc, blend, window, stride)  # raises the precise ValueError
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if pick_backend(backend, q.device, BACKENDS) == "triton":
        return triton_csa.csa_attention_triton(q, k, v, kc, vc, blend, window, stride, scale)
    return reference.csa_attention(q, k, v, kc, vc, blend, window, stride, scale)


def _well_formed(q, k, v, kc, vc, blend, window: int, stride: int) -> bool:
    """Every condition of `_validate` in one cheap expression (the common case costs a few microseconds;
    `_validate` builds its error messages eagerly, which costs tens)."""
    ts = (q, k, v, kc, vc, blend)
    if not all(isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES for x in ts) or q.dim() != 4:
        return False
    B, T, H, D = q.shape
    Hkv = k.shape[2] if k.dim() == 4 else 0
    Tc = -(-T // stride) if stride > 0 else -1
    return (
        B > 0 and T > 0 and window > 0 and stride > 0 and Hkv > 0 and H % Hkv == 0
        and k.shape == (B, T, Hkv, D) and v.shape == (B, T, Hkv, D)
        and kc.shape == (B, Tc, Hkv, D) and vc.shape == (B, Tc, Hkv, D) and blend.shape == (B, T, H * D)
        and q.device == k.device == v.device == kc.device == vc.device == blend.device
    )


def _validate(q, k, v, kc, vc, blend, window: int, stride: int) -> None:
    """Raise a ValueError naming the first bad input."""
    check_tensor("q", q, (None, None, None, None))
    B, T, H, D = q.shape
    check_tensor("k", k, (B, T, None, D))
    Hkv = k.shape[2]
    check(Hkv > 0 and H % Hkv == 0, f"query heads ({H}) must be a multiple of KV heads ({Hkv})")
    check_tensor("v", v, (B, T, Hkv, D))
    check(stride > 0 and window > 0, f"stride and window must be positive, got {stride}, {window}")
    Tc = -(-T // stride)
    check_tensor("kc", kc, (B, Tc, Hkv, D))
    check_tensor("vc", vc, (B, Tc, Hkv, D))
    check_tensor("blend", blend, (B, T, H * D))
    check(T > 0 and B > 0, f"empty input: B={B}, T={T}")
    check_same_device(q=q, k=k, v=v, kc=kc, vc=vc, blend=blend)


def compress_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    weight_k: torch.Tensor,
    weight_v: torch.Tensor,
    stride: int = 4,
    rotary_dim: int = 32,
    theta: float = 20000.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressor: kc = RoPE(mean_stride(k) weight_k^T) at positions stride j + stride // 2,
    vc = mean_stride(v) weight_v^T (blocks of `stride` tokens, zero-padded past T; as `reference.compress_kv`).

    Args:
        k: [B, T, Hkv, D] keys after k_norm, before RoPE; v: [B, T, Hkv, D] values.
        weight_k, weight_v: [Hkv * D, Hkv * D] (x @ W^T), mixing the KV heads.
        stride, rotary_dim, theta: block length, rotated dims (even, <= D), RoPE base.
        backend: "auto", "triton" (CUDA, eager; under torch.compile "auto" takes the reference) or
            "reference".

    Returns:
        kc, vc: [B, ceil(T / stride), Hkv, D].

    Example:
        >>> k, v, w = torch.randn(2, 10, 3, 64), torch.randn(2, 10, 3, 64), torch.randn(192, 192)
        >>> [x.shape for x in compress_kv(k, v, w, w)]
        [torch.Size([2, 3, 3, 64]), torch.Size([2, 3, 3, 64])]
    """
    if not (
        isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == 4 and v.shape == k.shape
        and isinstance(weight_k, torch.Tensor) and isinstance(weight_v, torch.Tensor)
        and weight_k.shape == weight_v.shape == (k.shape[2] * k.shape[3],) * 2
        and k.shape[0] > 0 and k.shape[1] > 0 and stride > 0
        and rotary_dim % 2 == 0 and 0 <= rotary_dim <= k.shape[3]
        and k.device == v.device == weight_k.device == weight_v.device
        and all(x.dtype in FLOAT_DTYPES for x in (k, v, weight_k, weight_v))
    ):
        _validate_compress(k, v, weight_k, weight_v, stride, rotary_dim)  # raises the precise ValueError
    name = pick_backend(backend, k.device, COMPRESS_BACKENDS)
    if name == "triton" and not (backend == "auto" and torch.compiler.is_compiling()):
        return triton_compress.compress_kv_triton(k, v, weight_k, weight_v, stride, rotary_dim, theta)
    return reference.compress_kv(k, v, weight_k, weight_v, stride, rotary_dim, theta)


COMPRESS_BACKENDS = {
    "triton": lambda device: device.type == "cuda" and triton_compress is not None,
    "reference": lambda device: True,
}


def _validate_compress(k, v, weight_k, weight_v, stride: int, rotary_dim: int) -> None:
    """Raise a ValueError naming the first bad input of `compress_kv`."""
    check_tensor("k", k, (None, None, None, None))
    B, T, Hkv, D = k.shape
    check_tensor("v", v, (B, T, Hkv, D))
    check_tensor("weight_k", weight_k, (Hkv * D, Hkv * D))
    check_tensor("weight_v", weight_v, (Hkv * D, Hkv * D))
    check(B > 0 and T > 0, f"empty input: B={B}, T={T}")
    check(stride > 0, f"stride must be positive, got {stride}")
    check(rotary_dim % 2 == 0 and 0 <= rotary_dim <= D, f"rotary_dim must be even, <= {D}, got {rotary_dim}")
    check_same_device(k=k, v=v, weight_k=weight_k, weight_v=weight_v)
