"""Hopper (sm_90) Gluon kernel for the [m, m] stages of `triton_ns`: POLY (B = a I + b R + c R R^T) and
PRODUCT (U V of commuting symmetric U, V), over the symmetric tiles of a set of matrices that share m.

These products have K = m (576 for the 95m model): 9 K steps of 64 per 128 x 128 tile, too few for
Triton's software pipeline to hide the load latency and the epilogue (our tl.dot stages ran them at 38-40% of
the bf16 matmul rate; profiles/ns.md). Here each program is persistent and warp-specialized:

- a loader warp streams both operand tiles of every K step through a ring of NB shared-memory slots with
  TMA (a 2-D descriptor over the packed [m, lda] workspaces: rows past a matrix's m read the next matrix,
  which only reaches output rows or columns >= m, clipped at the store);
- two consumer warpgroups take alternate tiles (ping-pong: one runs its epilogue while the other's wgmma
  run), each with a [BM, BM] buffer that holds the R tile POLY reads and then the result on its way out;
- the result tile and, off the diagonal, its transpose (the mirror, as in `triton_ns._sym_tile`) leave by
  TMA stores through a 3-D descriptor [matrices, m, lda], which clips at each matrix's m.

Same tile tables, workspaces and arithmetic as the Triton stages (fp32 accumulation over ascending K, the
same epilogue), so `triton_ns` uses it in their place when `usable`.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BM, BK, NB = 128, 64, 4  # tile, K step, ring slots: 4 x 32 KB of operands + 2 x 32 KB of epilogue buffers
CONSUMER_WARPS = 4


@gluon.jit
def _tile(tiles, t):
    return gl.load(tiles + 4 * t), gl.load(tiles + 4 * t + 1), gl.load(tiles + 4 * t + 2), gl.load(tiles + 4 * t + 3)


@gluon.jit
def _loader(a_desc, tiles, T, K, u, v, u2, lefts, rights, ready, empty,
            IS_POLY: gl.constexpr, MROWS: gl.constexpr, KSTEPS: gl.constexpr, NSLOT: gl.constexpr):  # fmt: skip
    TM: gl.constexpr = a_desc.block_type.shape[0]
    TK: gl.constexpr = a_desc.block_type.shape[1]
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    n = 0
    for t in range(pid, T, nprog):
        k, i, j, kind = _tile(tiles, t)
        left = (u + kind * (u2 - u)) * K + k  # (PRODUCT's tiles of kind SECOND: the second product's U)
        right = (u if IS_POLY else v) * K + k
        for kk in range(KSTEPS):
            s = n % NSLOT
            mbarrier.wait(empty.index(s), ((n // NSLOT) & 1) ^ 1)
            mbarrier.expect(ready.index(s), 2 * a_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [left * MROWS + i * TM, kk * TK], ready.index(s), lefts.index(s))
            tma.async_copy_global_to_shared(a_desc, [right * MROWS + j * TM, kk * TK], ready.index(s),
                                            rights.index(s))  # fmt: skip
            n += 1


@gluon.jit
def _consumer(c_desc, tiles, T, K, u, d, d2, coef_a, coef_b, coef_c, lefts, rights, ready, empty, order, cbuf, rbar,
              IS_POLY: gl.constexpr, KSTEPS: gl.constexpr, NSLOT: gl.constexpr, CONS: gl.constexpr,
              num_warps: gl.constexpr):  # fmt: skip
    TM: gl.constexpr = c_desc.block_type.shape[1]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, TM, 16])  # fmt: skip
    c2 = cbuf.reshape([TM, TM])
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    nt = CONS  # this program's tile ordinal: its K steps are ring positions nt * KSTEPS ...
    rphase = 0
    for t in range(pid + CONS * nprog, T, 2 * nprog):
        k, i, j, kind = _tile(tiles, t)
        tma.store_wait(pendings=0)  # the buffer is free again
        if IS_POLY:  # the R tile of the epilogue, loaded during the K loop
            mbarrier.expect(rbar, c_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(c_desc, [u * K + k, i * TM, j * TM], rbar, cbuf)
        # ping-pong: start after the other consumer has passed all its ready-waits of the previous tile
        mbarrier.wait(order, (nt - 1) & 1, pred=nt > 0)
        n = nt * KSTEPS
        acc = gl.zeros((TM, TM), dtype=gl.float32, layout=layout)
        for kk in range(KSTEPS):
            s = n % NSLOT
            mbarrier.wait(ready.index(s), (n // NSLOT) & 1)
            acc = warpgroup_mma(lefts.index(s), rights.index(s).permute((1, 0)), acc, use_acc=kk > 0, is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
            mbarrier.arrive(empty.index((n + NSLOT - 1) % NSLOT), count=1, pred=kk > 0)
            n += 1
        mbarrier.arrive(order, count=1)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index((n + NSLOT - 1) % NSLOT), count=1)
        if IS_POLY:  # B = c R R^T + b R + a I (a on the diagonal of the diagonal tiles)
            mbarrier.wait(rbar, rphase)
            rphase ^= 1
            acc = coef_c * acc + coef_b * c2.load(layout).to(gl.float32)
            rows = gl.arange(0, TM, layout=gl.SliceLayout(1, layout))
            cols = gl.arange(0, TM, layout=gl.SliceLayout(0, layout))
            eye = (rows[:, None] == cols[None, :]) & (i == j)
            acc = gl.where(eye, acc + coef_a, acc)
        y = acc.to(c_desc.dtype)
        dst = (d + kind * (d2 - d)) * K + k
        c2.store(y)
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [dst, i * TM, j * TM], cbuf)
        if i != j:  # the mirror tile
            tma.store_wait(pendings=0)
            c2.store(gl.permute(y, [1, 0]))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [dst, j * TM, i * TM], cbuf)
        nt += 2
    tma.store_wait(pendings=0)


@gluon.jit
def _sym_products_kernel(a_desc, c_desc, tiles, T, K, u, v, d, u2, d2, coef_a, coef_b, coef_c,
                         IS_POLY: gl.constexpr, MROWS: gl.constexpr, KSTEPS: gl.constexpr, NSLOT: gl.constexpr,
                         num_warps: gl.constexpr):  # fmt: skip
    dtype: gl.constexpr = a_desc.dtype
    lefts = gl.allocate_shared_memory(dtype, [NSLOT] + a_desc.block_type.shape, a_desc.layout)
    rights = gl.allocate_shared_memory(dtype, [NSLOT] + a_desc.block_type.shape, a_desc.layout)
    cbuf0 = gl.allocate_shared_memory(dtype, c_desc.block_type.shape, c_desc.layout)
    cbuf1 = gl.allocate_shared_memory(dtype, c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NSLOT, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NSLOT, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NSLOT):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    order = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    rbar0 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    rbar1 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(order, count=1)
    mbarrier.init(rbar0, count=1)
    mbarrier.init(rbar1, count=1)
    # the default partition and a worker: the two consumers (num_warps each); a 1-warp worker: the loader
    # fmt: off
    gl.warp_specialize(
        [
            (_consumer, (c_desc, tiles, T, K, u, d, d2, coef_a, coef_b, coef_c, lefts, rights, ready, empty, order,
                         cbuf0, rbar0, IS_POLY, KSTEPS, NSLOT, 0, num_warps)),
            (_consumer, (c_desc, tiles, T, K, u, d, d2, coef_a, coef_b, coef_c, lefts, rights, ready, empty, order,
                         cbuf1, rbar1, IS_POLY, KSTEPS, NSLOT, 1, num_warps)),
            (_loader, (a_desc, tiles, T, K, u, v, u2, lefts, rights, ready, empty, IS_POLY, MROWS, KSTEPS, NSLOT)),
        ],
        [num_warps, 1],
        [232, 40],  # registers per thread: consumers (a 128 x 128 fp32 accumulator each), loader
    )
    # fmt: on


def usable(device: torch.device, shapes_m: set[int], work_dtype: torch.dtype) -> bool:
    """Whether the kernel serves a set: an sm_90 GPU (wgmma, TMA), 16-bit operands, one m for every matrix."""
    return (
        device.type == "cuda"
        and torch.cuda.get_device_capability(device) == (9, 0)
        and work_dtype in (torch.bfloat16, torch.float16)
        and len(shapes_m) == 1
    )


class SymProducts:
    """Descriptors over a runner's square workspaces `sq` (nsq buffers of K matrices [m, lda]) and the launch
    of one POLY or PRODUCT stage (buffer indices as in `triton_ns._Launch`)."""

    def __init__(self, sq: torch.Tensor, K: int, m: int, lda: int):
        self.K, self.m = K, m
        gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[sq.dtype]
        rows = sq.view(-1, lda)
        mats = sq.view(-1, m, lda)
        a_layout = gl.NVMMASharedLayout.get_default_for([BM, BK], gdt)
        c_layout = gl.NVMMASharedLayout.get_default_for([1, BM, BM], gdt)
        self.a_desc = TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [BM, BK], a_layout)
        self.c_desc = TensorDescriptor(mats, list(mats.shape), list(mats.stride()), [1, BM, BM], c_layout)
        self.programs = torch.cuda.get_device_properties(sq.device).multi_processor_count
        self.ksteps = triton.cdiv(lda, BK)

    def launch(self, tiles: torch.Tensor, poly: bool, coeffs, u: int, v: int, d: int, u2: int, d2: int) -> None:
        T = tiles.shape[0]
        _sym_products_kernel[(min(self.programs, T),)](
            self.a_desc, self.c_desc, tiles, T, self.K, u, v, d, u2, d2, *coeffs, IS_POLY=poly, MROWS=self.m,
            KSTEPS=self.ksteps, NSLOT=NB, num_warps=CONSUMER_WARPS,
        )  # fmt: skip
