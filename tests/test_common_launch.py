"""kernels.common.launch: its cached path (C launcher called directly) against Triton's own launch."""

import pytest
import torch

from kernels import common

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a Linux-only dependency
    triton = None


if triton is not None:

    @triton.jit
    def _axpb(X, Y, n, a, b, BLOCK: tl.constexpr):
        """y = a x + b n over n elements (n enters the values, so its specialization is seen)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < n, other=0.0)
        tl.store(Y + offs, (a * x + b * n).to(Y.dtype.element_ty), mask=offs < n)


@pytest.mark.gpu
def test_cached_launch_matches_triton():
    """Every call twice (the second one takes the cached path) over what Triton specializes on: dtypes,
    16-byte alignment (views at odd offsets), integers equal to 1, multiples of 16 and others."""
    base = torch.randn(4096 + 7, device="cuda")
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for offset in (0, 1, 4):
            for n in (1, 16, 17, 1000, 4096):
                cases.append((base.to(dtype)[offset : offset + n], n))
    for x, n in cases:
        for _ in range(2):
            y = torch.full((n,), float("nan"), device="cuda", dtype=x.dtype)
            common.launch(_axpb, (triton.cdiv(n, 256),), x, y, n, 2.0, 0.5, BLOCK=256)
            torch.testing.assert_close(y, (2.0 * x.float() + 0.5 * n).to(x.dtype))
    key_ints = {k[-3] for k in common._COMPILED if k[0] == id(_axpb)}  # n by value below 2^31
    assert {1, 16, 17} <= key_ints


@pytest.mark.gpu
def test_keyed_launch_matches_triton():
    """launch_keyed binds (key, device) at its first 16-byte aligned call and relaunches that compiled kernel
    on the addresses it is given (here: the output written at an offset inside a larger buffer); a
    misaligned input under a bound key goes through `launch` (its own specialization), every time."""
    base = torch.randn(4096 + 7, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        for offset in (0, 1, 0, 4, 0):
            for n in (16, 17, 1000):
                x = base.to(dtype)[offset : offset + n]
                out = torch.full((n + 64,), float("nan"), device="cuda", dtype=dtype)
                y = out[64:]  # 128 bytes in: aligned, passed by address
                first = lambda x=x, y=y, n=n: ((triton.cdiv(n, 256),), (x, y, n, 2.0, 0.5), dict(BLOCK=256))
                ptrs = (x.data_ptr(), y.data_ptr())
                common.launch_keyed(_axpb, ("axpb", "cuda", n, dtype), first, ptrs, (n, 2.0, 0.5))
                torch.testing.assert_close(y, (2.0 * x.float() + 0.5 * n).to(dtype))
                assert out[:64].isnan().all()
    device = torch.cuda.current_device()
    dtypes = (torch.float32, torch.bfloat16)
    keys = {(id(_axpb), ("axpb", "cuda", n, d), device) for n in (16, 17, 1000) for d in dtypes}
    assert keys <= set(common._BOUND)
