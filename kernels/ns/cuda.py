"""CUDA C++ Newton-Schulz backend: `csrc/ns/ns.cu` compiled at run time by NVRTC through CuPy.

CuPy (`pip install hyla[cuda]`, i.e. cupy-cuda13x) is optional: without it, or off CUDA, `available`
is False. Tensors stay torch's; the kernels get raw device pointers and run on torch's current stream.

Per stack [N, m, n] (wide orientation, a tall stack is read transposed), three launches a step, each
over the whole stack: A = X X^T and B = c A A^T + b A by `ns_sym` (upper tiles, mirrored), then
X' = B X + a X by `ns_gemm`. Normalization and the bf16 cast happen in torch on the way into a
zero-padded workspace (both dims rounded up to the 64-element tile), the cast back on the way out.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

try:
    import cupy
except ImportError:  # optional dependency
    cupy = None

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "ns" / "ns.cu"
TILE = 64
THREADS = 128
TINY = 8  # stacks with a side <= TINY are left to the fp32 reference by the dispatcher (bf16 error > 2e-2)


def available(device: torch.device) -> bool:
    return cupy is not None and device.type == "cuda" and SOURCE.exists()


@functools.cache
def _module(device_index: int):
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++17",), backend="nvrtc")


def _launch(device: torch.device, name: str, grid: tuple[int, int, int], args: tuple) -> None:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    kern = _module(idx).get_function(name)
    with cupy.cuda.Device(idx), cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
        kern(grid, (THREADS, 1, 1), args)


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def ns_sym(L: torch.Tensor, E: torch.Tensor | None, O: torch.Tensor, alpha: float, beta: float, full=False):
    """O = alpha * L L^T + beta * E for stacks L [N, M, K], E, O [N, M, M] (bf16, padded to TILE)."""
    N, M, K = L.shape
    nt = M // TILE
    E = O if E is None else E
    grid = (nt * nt if full else nt * (nt + 1) // 2, 1, N)
    i32, i64, f32 = np.int32, np.int64, np.float32
    args = (_ptr(L), _ptr(L), _ptr(E), _ptr(O), i32(nt), i32(K), i32(K), i32(M), i32(M),
            i64(M * K), i64(M * M), i64(M * M), f32(alpha), f32(beta))  # fmt: skip
    _launch(L.device, "ns_sym_full" if full else "ns_sym", grid, args)


def ns_gemm(L: torch.Tensor, R: torch.Tensor, E: torch.Tensor, O: torch.Tensor, alpha: float, beta: float):
    """O = alpha * L R + beta * E for stacks L [N, M, K], R [N, K, Nc], E, O [N, M, Nc] (bf16, padded)."""
    N, M, K = L.shape
    Nc = R.shape[2]
    i32, i64, f32 = np.int32, np.int64, np.float32
    args = (_ptr(L), _ptr(R), _ptr(E), _ptr(O), i32(K), i32(K), i32(Nc), i32(Nc), i32(Nc),
            i64(M * K), i64(K * Nc), i64(M * Nc), i64(M * Nc), f32(alpha), f32(beta))  # fmt: skip
    _launch(L.device, "ns_gemm", (Nc // TILE, M // TILE, N), args)


def newton_schulz_cuda(
    G: torch.Tensor, coeffs: list[tuple[float, float, float]], eps: float = 1e-7, sym: bool = True
) -> torch.Tensor:
    """len(coeffs) quintic steps on a validated CUDA stack G [N, m, n] or matrix [m, n]; G's dtype out."""
    G3 = G if G.dim() == 3 else G.unsqueeze(0)
    tall = G3.shape[1] > G3.shape[2]
    Gw = G3.mT if tall else G3
    N, m, n = Gw.shape
    Mp, Np = -(-m // TILE) * TILE, -(-n // TILE) * TILE
    X = torch.zeros(N, Mp, Np, dtype=torch.bfloat16, device=G.device)
    norm = torch.linalg.matrix_norm(Gw.float(), keepdim=True)
    X[:, :m, :n] = Gw.float() / (norm + eps)
    X2 = torch.empty_like(X)
    A = torch.empty(N, Mp, Mp, dtype=torch.bfloat16, device=G.device)
    B = torch.empty_like(A)
    for a, b, c in coeffs:
        ns_sym(X, None, A, 1.0, 0.0, full=not sym)  # A = X X^T
        ns_sym(A, A, B, c, b, full=not sym)  # B = c A^2 + b A
        ns_gemm(B, X, X, X2, 1.0, a)  # X' = B X + a X
        X, X2 = X2, X
    out = X[:, :m, :n]
    out = (out.mT if tall else out).to(G.dtype)
    return out.contiguous().view(G.shape)
