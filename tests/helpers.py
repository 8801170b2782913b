"""Shared test utilities: relative error, Triton compile-only checks for Hopper, a checked launch_keyed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in `out` gives inf (it never passes)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def checking_launch_keyed(seen: list):
    """A stand-in for `kernels.common.launch_keyed` that checks what a launcher hands the fast path (device
    addresses and scalars, no tensors: a swapped or stale address would go unnoticed off the GPU) against the
    tensor launch its `first()` builds: the addresses are those tensor arguments' data pointers and the scalars
    the remaining arguments, in the kernel's parameter order. Appends each key's first element to `seen`, then
    launches through Triton's front end."""

    def checked(kernel, key, first, addresses, scalars):
        grid, args, meta = first()
        n = len(addresses)
        assert [a.data_ptr() for a in args[:n]] == list(addresses), key[0]
        assert all(isinstance(a, torch.Tensor) for a in args[:n]) and tuple(args[n:]) == tuple(scalars), key[0]
        assert [name for name in kernel.arg_names if name not in meta] == kernel.arg_names[: len(args)], key[0]
        seen.append(key[0])
        kernel[grid](*args, **meta)

    return checked


def compile_for_hopper(kernel, signature: dict[str, str], constexprs: dict[str, object], aligned: bool = False,
                       **options):  # fmt: skip
    """Compile a @triton.jit kernel for sm_90 without a GPU; raises if it does not compile.

    Works with the kernel as decorated under TRITON_INTERPRET=1 too (it wraps the Python function).
    `aligned`: every pointer and integer argument specialized as a multiple of 16 (bytes, elements), as
    the runtime launcher does for such arguments (without it nothing proves 16-byte accesses, so loads are
    not vectorized and K loops not pipelined with cp.async). `options`: num_warps, num_stages, ...
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    attrs = {}
    if aligned:
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items() if t[0] in "*i"}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options or None)


def run_without_interpreter(code: str, timeout: float = 300) -> str:
    """Run `code` in a fresh Python process without TRITON_INTERPRET and return its stdout; fails the test
    on a non-zero exit. Compile-only checks need it: under the interpreter, triton.language's own @jit
    helpers (tl.sum, tl.cdiv, ...) and ours are interpreter objects that the compiler cannot lower."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
