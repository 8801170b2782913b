"""Input checks, backend selection, launch paths and workspaces shared by the ops."""

from __future__ import annotations

import functools
import itertools
import math
import operator
import os
from collections.abc import Callable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check(cond: bool, msg: str) -> None:
    """Raise a ValueError with `msg` unless `cond`: bad input fails here, before any launch."""
    if not cond:
        raise ValueError(msg)


def check_tensor(name: str, x: torch.Tensor, shape: Sequence[int | None], dtypes=FLOAT_DTYPES) -> None:
    """Check rank, sizes (None = any) and dtype of one input tensor (messages are built only on failure:
    this runs on every call of an op)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape, strict=False)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"inputs must be on one device, got {devices}")
    return first


def pick_backend(backend: str, device: torch.device, available: dict[str, Callable[[torch.device], bool]]) -> str:
    """Resolve "auto" to the first available backend in `available`'s order; validate the rest.

    The environment variable HYLA_BACKEND (e.g. `HYLA_BACKEND=reference`, the pure-PyTorch fallback)
    replaces "auto" for every op that has a backend of that name.
    """
    if backend == "auto":
        forced = os.environ.get("HYLA_BACKEND", "auto")
        if forced in available and available[forced](device):
            return forced
        return next(name for name, ok in available.items() if ok(device))
    check(backend in available, f"unknown backend {backend!r}; choose from {['auto', *available]}")
    check(available[backend](device), f"backend {backend!r} is not available for device {device}")
    return backend


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Reference ops compute in fp32, or fp64 for fp64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def without_autocast(fn: Callable) -> Callable:
    """Run a reference op in its stated precision even inside a bf16 autocast region (whose matmuls
    would otherwise run in bf16 and mix dtypes with the op's fp32 arithmetic)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def fast_apply(function: type[torch.autograd.Function]) -> Callable:
    """`function.apply` without its Python front end where that is safe: outside functorch transforms the
    Python `Function.apply` only adds a pytree pass over the arguments (unwrapping functorch wrappers, which
    plain tensors are not) before calling the C implementation, about 10 us per call on the H100 hosts
    (profiles/csa.md). Inside transforms, and on a torch without that C entry, the Python one."""
    c_apply = getattr(torch._C, "_FunctionBase", object).__dict__.get("apply")
    if c_apply is None:
        return function.apply
    bound = c_apply.__get__(None, function)
    return lambda *args: (function.apply if torch._C._are_functorch_transforms_active() else bound)(*args)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side grid sizes (triton.cdiv is a constexpr function: microseconds per host call,
    on the path to each launch)."""
    return -(-a // b)


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """kernel[grid](*args, **meta), with Triton's per-call argument binding skipped after the first call.

    For kernels whose constexpr parameters all come last and are passed by keyword in `meta` (with the
    launch options: num_warps, ...), runtime arguments positionally. Triton specializes a compiled kernel
    on the dtypes and 16-byte alignment of pointer arguments and on integers being 1 or multiples of 16
    (and on their width); the compiled kernel of a first launch is cached under a key at least as fine
    (dtypes; addresses and integers from 2^31 up by their residue mod 16; smaller integers by value, a new
    entry per value, the cache being emptied past _MAX_ENTRIES) and reused by calling its C launcher
    directly on the current stream (the host cost of a launch is most of a small op's time). Tensors reach
    the C launcher as their device addresses (ints): given a tensor it would call data_ptr() and check the
    address with the driver (cuPointerGetAttribute) once per pointer argument on every launch; callers
    validate devices before launching. Launch hooks (Triton's launch_enter/exit_hook, used by profilers
    such as proton) are not called on that path: set FAST_LAUNCH = False for them. The interpreter (CPU
    tensors) and kernels of another form take the plain path.
    """
    if not (FAST_LAUNCH and args[0].is_cuda):
        kernel[grid](*args, **meta)
        return
    _launch_cached(kernel, grid, args, meta)


def _launch_cached(kernel, grid: tuple[int, ...], args: tuple, meta: dict) -> tuple | None:
    """`launch`'s fast path; returns the cache entry it launched with (None: the kernel is not of that form)."""
    device = torch.cuda.current_device()
    ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    key = (  # (a JITFunction hashes through a lock: its id is cheaper; bools and floats are not specialized)
        id(kernel), device, *meta.items(), *map(getattr, args, _DTYPE, _NONE),
        *[(p if p < 0x80000000 else p & 15) if type(p) is int else None for p in ptrs],
    )
    entry = _COMPILED.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **meta)
        compiled = compiled.result() if hasattr(compiled, "result") else compiled  # async compile future
        tail = kernel.params[len(args) :]
        if all(p.is_constexpr and p.name in meta for p in tail) and not any(
            p.is_constexpr for p in kernel.params[: len(args)]
        ):
            if len(_COMPILED) >= _MAX_ENTRIES:
                _COMPILED.clear()
            constexprs = tuple(meta[p.name] for p in tail)
            _COMPILED[key] = (compiled.run, compiled.function, compiled.packed_metadata, constexprs, compiled)
            return _COMPILED[key]
        return None
    run, function, metadata, constexprs, _ = entry
    gx, gy, gz = (*grid, 1, 1)[:3]
    # the launcher's arguments: grid, stream, kernel, its metadata, launch metadata and hooks, every parameter
    run(gx, gy, gz, _current_stream(device), function, metadata, None, None, None, *ptrs, *constexprs)
    return entry


def launch_keyed(kernel, key: tuple, first: Callable[[], tuple], addresses: Sequence[int], scalars: tuple) -> None:
    """kernel[grid](*args, **meta), where (grid, args, meta) = first(), for a call site that names its own cache
    key: cheaper than `launch`, which builds its key from every argument (CSA's backward launcher on an H100
    host: 90 -> 73 us for its two launches, profiles/csa.md). Bindings are per kernel object: two kernels
    (say, renamed copies of one) never share one under equal keys.

    `addresses` are the device addresses (ints) of the tensors that come first in `args`, `scalars` the rest
    of `args`; `first` builds `args` itself, so a caller may pass addresses inside one buffer (such as a
    workspace holding several arrays) and make the typed views only there. `key` must determine the tensors'
    device and everything else Triton specializes this kernel on apart from the 16-byte alignment of the
    addresses: the grid and meta, the tensors' dtypes and the integers in `scalars` (an op's shapes, dtypes
    and options, say). `first` is called only when (kernel, key, current device) is new, or when an address is
    not 16-byte aligned: such calls go through `launch`, and the first aligned one binds (kernel, key) to the
    compiled kernel and its grid. Same fast-path conditions and caveats as `launch` (FAST_LAUNCH, CUDA
    tensors, hooks not called).
    """
    device = torch.cuda.current_device() if FAST_LAUNCH and torch.cuda.is_initialized() else None
    bound = _BOUND.get((id(kernel), key, device))
    aligned = not functools.reduce(operator.or_, addresses) & 15
    if bound is None or not aligned:
        grid, args, meta = first()
        if not (FAST_LAUNCH and args[0].is_cuda):
            kernel[grid](*args, **meta)
            return
        entry = _launch_cached(kernel, grid, args, meta)
        if entry is not None and aligned:
            if len(_BOUND) >= _MAX_ENTRIES:
                _BOUND.clear()
            _BOUND[id(kernel), key, device] = (*entry[:4], *(*grid, 1, 1)[:3], entry[4])
        return
    run, function, metadata, constexprs, gx, gy, gz, _ = bound
    run(gx, gy, gz, _current_stream(device), function, metadata, None, None, None, *addresses, *scalars, *constexprs)


def bound_kernel(kernel, key: tuple, n_args: int) -> tuple | bool | None:
    """What `launch_keyed` bound to (kernel, key) on the current device, for a launch from C++ (csrc/csa/csa_node.cpp):
    (CUfunction handle, grid, threads per program, dynamic shared memory bytes, the number of trailing scratch
    pointers Triton appends, the kinds of the first `n_args` parameters in Triton's compiled signature: 0
    specialized away, 1 pointer, 2 int32, 3 int64, 4 fp32). None while `key` is unbound; False for a kernel
    that needs more than a plain cuLaunchKernel (scratch memory, clusters, dependent or cooperative launch)."""
    bound = _BOUND.get((id(kernel), key, torch.cuda.current_device()))
    if bound is None:
        return None
    *_, gx, gy, gz, compiled = bound
    md = compiled.metadata
    plain = not (
        getattr(md, "global_scratch_size", 0)
        or getattr(md, "profile_scratch_size", 0)
        or getattr(md, "num_ctas", 1) != 1
        or getattr(md, "launch_pdl", False)
        or getattr(md, "launch_cooperative_grid", False)
    )
    if not plain:
        return False
    types = list(compiled.src.signature.values())[:n_args]
    kinds = [0 if t == "constexpr" else 1 if t.startswith("*") else _ARG_KINDS.get(t) for t in types]
    if len(kinds) != n_args or None in kinds:
        return False
    scratch = hasattr(md, "global_scratch_size") + hasattr(md, "profile_scratch_size")
    return compiled.function, (gx, gy, gz), 32 * md.num_warps, md.shared, scratch, kinds


_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton's own launch uses
_DTYPE, _NONE = itertools.repeat("dtype"), itertools.repeat(None)  # getattr(arg, "dtype", None) over args
_COMPILED: dict = {}
_BOUND: dict = {}  # launch_keyed: (id(kernel), key, device) -> _COMPILED's entry, the grid before its last item
_ARG_KINDS = {"i32": 2, "i64": 3, "fp32": 4}  # bound_kernel: scalar types of Triton's signatures
_MAX_ENTRIES = 4096
FAST_LAUNCH = True  # False: every launch through Triton's JIT front end (bench/csa.py measures both)


# ---- workspaces: several arrays of an op in one allocation, passed to `launch_keyed` by address ----


def placeholder(device: torch.device) -> torch.Tensor:
    """An empty fp32 tensor for a pointer argument that a kernel does not touch (no initial state, ...): one
    per device, reused; never returned to a caller."""
    t = _PLACEHOLDERS.get(device)
    if t is None:
        t = _PLACEHOLDERS[device] = torch.empty(0, device=device)
    return t


_PLACEHOLDERS: dict[torch.device, torch.Tensor] = {}


def carve(parts: list[tuple[str, torch.dtype, tuple]]) -> tuple[int, dict[str, tuple[int, torch.dtype, tuple]]]:
    """Arrays (name, dtype, shape) placed one after another in one uint8 workspace, each at a 16-byte boundary
    (Triton specializes pointers on that alignment, which every array then keeps): (total bytes, name ->
    (byte offset, dtype, shape)). One allocation instead of one per array: each costs microseconds of host
    time, and at small batches the op is host-bound."""
    size, layout = 0, {}
    for name, dtype, shape in parts:
        layout[name] = (size, dtype, shape)
        size += -(-math.prod(shape) * dtype.itemsize // 16) * 16
    return size, layout


def carve_named(parts: list[tuple[str, torch.dtype, tuple]], names: tuple[str, ...]) -> tuple[int, dict, tuple]:
    """`carve(parts)` and the byte offsets of `names` in its layout, in that order (None for a name it did not
    place: `addresses` gives the placeholder's address there)."""
    size, layout = carve(parts)
    return size, layout, tuple(layout[n][0] if n in layout else None for n in names)


def views(ws: torch.Tensor, layout: dict, names: tuple[str, ...]) -> list[torch.Tensor]:
    """Typed views of the arrays `names` that `carve` placed in ws (the placeholder for one it did not): made
    only for Triton's front end, on a launch with a new key; the other launches pass addresses."""
    out = []
    for name in names:
        if name not in layout:
            out.append(placeholder(ws.device))
            continue
        off, dtype, shape = layout[name]
        out.append(ws[off : off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape))
    return out


def addresses(ws: torch.Tensor, offsets: tuple[int | None, ...]) -> list[int]:
    """Device addresses of `carve`'s arrays at `offsets` (None: the placeholder's address)."""
    base = ws.data_ptr()
    return [placeholder(ws.device).data_ptr() if off is None else base + off for off in offsets]
