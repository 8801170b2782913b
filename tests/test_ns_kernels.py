"""Newton-Schulz kernels (kernels/ns): Triton under the interpreter (fp32, small shapes) and compiled for
sm_90, the CUDA source compiled by nvcc for sm_90a, the dispatcher's input checks; on a GPU, both
kernel backends in bf16 on the 95m model's Muon shapes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels.ns import NS_COEFFS, cuda, muon_update_, newton_schulz, newton_schulz_many, polar_express, triton_ns
from kernels.ns.reference import newton_schulz as ns_ref
from tests.helpers import relerr, run_without_interpreter

ROOT = Path(__file__).resolve().parents[1]
# interpreter-sized tiles; sides <= 16 (and 40 = 32 + 8) leave a last row block of at most half a tile, which
# gets half-height tiles in stage 3 (16 rows: the smallest tensor-core product)
SMALL = triton_ns.Config(bs=32, bk=16, bm=32, bn=32, bk3=16)


def ref64(G: torch.Tensor, schedule=None) -> torch.Tensor:
    """Float64 reference iteration (per-step coefficients when `schedule` is given), on G's device."""
    if schedule is None:
        return ns_ref(G.double(), 5)
    return newton_schulz(G.double(), len(schedule), schedule, backend="reference")


def sv_range(X: torch.Tensor) -> tuple[float, float]:
    s = torch.linalg.svdvals(X.double().cpu())
    return s.min().item(), s.max().item()


# ---- CPU: Triton under the interpreter, fp32 operands (the interpreter computes bf16 wrongly) --------

interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels on CPU tensors under TRITON_INTERPRET=1"
)


def _mixed_inputs(gen: torch.Generator) -> list[torch.Tensor]:
    # wide, tall, square, widths that are not multiples of 16 or of the tiles, a [m, 4] tall one
    return [
        torch.randn(3, 20, 45, generator=gen),
        torch.randn(50, 24, generator=gen),
        torch.randn(2, 7, 7, generator=gen),
        torch.randn(40, 4, generator=gen),
        torch.randn(9, 33, generator=gen),
        torch.randn(40, 70, generator=gen),
    ]


@interpreter
@pytest.mark.parametrize("sym", [True, False])
def test_triton_interpreter_grouped_matches_reference(sym):
    gen = torch.Generator().manual_seed(1 + sym)
    Gs = _mixed_inputs(gen)
    outs = triton_ns.newton_schulz_triton(Gs, [NS_COEFFS] * 5, work_dtype=torch.float32, sym=sym, config=SMALL)
    for G, X in zip(Gs, outs, strict=True):
        assert X.shape == G.shape and X.dtype == G.dtype
        assert relerr(X, ref64(G)) < 1e-4, G.shape
        lo, hi = sv_range(X)
        assert 0.6 <= lo and hi <= 1.25, (G.shape, lo, hi)
    # a stack's result equals the result of each of its matrices alone, and of a call per group
    alone = triton_ns.newton_schulz_triton([Gs[0][1]], [NS_COEFFS] * 5, work_dtype=torch.float32, config=SMALL)[0]
    assert torch.equal(alone, outs[0][1])
    single = triton_ns.newton_schulz_triton([Gs[1]], [NS_COEFFS] * 5, work_dtype=torch.float32, config=SMALL)[0]
    assert torch.equal(single, outs[1])


@interpreter
def test_triton_interpreter_half_tiles():
    """A side 40 = 32 + 8 gets half-height tiles for its last row block in stage 3 (full symmetric tiles);
    results equal those of padded full tiles."""
    plan = triton_ns._plan(((40, 70),), SMALL, True, torch.device("cpu"))
    assert plan.tiles_sym[:, 1:].tolist() == [[0, 0, 0], [0, 1, 0], [1, 1, 0]]  # (tile row, tile column, kind)
    assert sorted({tuple(t) for t in plan.tiles_x[:, 1:4:2].tolist()}) == [(0, 0), (1, 1)]
    Gs = _mixed_inputs(torch.Generator().manual_seed(7))
    half = triton_ns.newton_schulz_triton(Gs, [NS_COEFFS] * 5, work_dtype=torch.float32, config=SMALL)
    full = triton_ns.newton_schulz_triton(Gs, [NS_COEFFS] * 5, work_dtype=torch.float32,
                                          config=dataclasses.replace(SMALL, half_tiles=False))  # fmt: skip
    for X, Y in zip(half, full, strict=True):
        assert relerr(X, Y) < 1e-6


@interpreter
def test_triton_interpreter_one_step_schedule_and_strided_input():
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(30, 70, generator=gen)[:, 3:40]  # row stride 70: copied into the aligned layout
    schedule = [(3.0, -3.2, 1.2), (2.5, -2.0, 0.6), (1.9, -1.4, 0.5)]
    for sched in ([NS_COEFFS], schedule):
        X = triton_ns.newton_schulz_triton([G], sched, work_dtype=torch.float32, config=SMALL)[0]
        assert relerr(X, ref64(G, sched)) < 1e-4


@interpreter
@pytest.mark.parametrize("segments", [(2, 2, 1), (3, 2)])
def test_triton_interpreter_gram_form(segments, monkeypatch):
    """The Gram form on every matrix (squares and tall ones included), in segments of 2 + 2 + 1 and 3 + 2
    steps, is the same iteration: in fp32 within 1e-4 of the float64 plain one, with constant or (forcing
    the segments: `_segments` keeps schedules plain) per-step coefficients. Longer segments drift even in
    fp32: 3e-4 with 4 + 1 steps, 6e-3 with one of 5 steps for the 7 x 7 squares, whose near-zero singular
    values the quintic lifts the most."""
    cfg = dataclasses.replace(SMALL, gram_aspect=1.0, gram_min_rows=1)
    Gs = _mixed_inputs(torch.Generator().manual_seed(8))
    schedule = [(3.0, -3.2, 1.2), (2.5, -2.0, 0.6), (1.9, -1.4, 0.5), (1.9, -1.4, 0.5), NS_COEFFS]
    monkeypatch.setattr(triton_ns, "_segments", lambda schedule, work_dtype, drift: segments)
    monkeypatch.setattr(triton_ns, "_CALLS", {})  # (calls built with other segments)
    for sched in ([NS_COEFFS] * 5, schedule):
        outs = triton_ns.newton_schulz_triton(Gs, sched, work_dtype=torch.float32, config=cfg)
        for G, X in zip(Gs, outs, strict=True):
            assert relerr(X, ref64(G, sched)) < 1e-4, (G.shape, sched)


def test_gram_segments_and_recipe():
    """The default drift bound gives the default coefficients 2 + 2 + 1 steps in bf16, 3 + 2 in fp16, one
    segment in fp32; per-step schedules (Polar Express) run plain. Segments of 1 step are the plain iteration
    (1 + 3 per step launches); 3 + 2 steps take 18 launches, with 2 rectangular pairs (XXT, APPLY) and 14
    [m, m] products (POLY, and PRODUCT per product); 2 + 2 + 1 steps 18 launches, 3 pairs, 11 products. With
    3 X workspaces (fp16 work, X_0 in bf16) X_0's is read by the first segment only."""
    drift = triton_ns.Config().gram_drift
    const = (NS_COEFFS,) * 5
    assert triton_ns._segments(const, torch.bfloat16, drift) == (2, 2, 1)
    assert triton_ns._segments(const, torch.float16, drift) == (3, 2)
    assert triton_ns._segments(const, torch.float32, drift) == (5,)
    assert triton_ns._segments(polar_express(5), torch.float16, drift) == (1,) * 5
    assert triton_ns._segments(const, torch.bfloat16, 1e-3) == (1,) * 5
    P, X, B, A, Q = (int(c) for c in (triton_ns.PREP, triton_ns.XXT, triton_ns.POLY, triton_ns.APPLY,
                                      triton_ns.PRODUCT))  # fmt: skip
    plain = triton_ns._recipe(const, (1,) * 5)
    assert [L.stage for L in plain] == [P] + [X, B, A] * 5
    assert [(L.x_in, L.x_out) for L in plain if L.stage == A] == [(0, 1), (1, 0), (0, 1), (1, 0), (0, 1)]
    plain3 = triton_ns._recipe(const, (1,) * 5, x_buffers=3)
    assert [(L.x_in, L.x_out) for L in plain3 if L.stage == A] == [(0, 1), (1, 2), (2, 1), (1, 2), (2, 1)]
    gram = triton_ns._recipe(const, (3, 2))
    assert len(gram) == 18 and [L.stage for L in gram].count(X) == 2 and gram[-1].stage == A and gram[-1].last
    assert sum(1 + (L.u2 is not None) for L in gram if L.stage in (B, Q)) == 14
    gram = triton_ns._recipe(const, (2, 2, 1))
    assert len(gram) == 18 and [L.stage for L in gram].count(X) == 3 and gram[-1].stage == A and gram[-1].last
    assert sum(1 + (L.u2 is not None) for L in gram if L.stage in (B, Q)) == 11


def _muon_case(device, gen, shapes):
    """Parameters, gradients, momentum buffers and per-matrix (mu, nesterov, decay, alpha) for `shapes`."""
    ts = [[torch.randn(s, generator=gen, device=device) for s in shapes] for _ in range(3)]
    hyper = [(0.95, True, 1 - 2e-4, 0.02), (0.9, False, 0.99, 0.05)] * len(shapes)
    return (*ts, [list(c) for c in zip(*hyper[: len(shapes)], strict=True)])


def _muon_expected(params, grads, bufs, mus, nesterov, decay, alpha):
    """The new momentum buffers and the Newton-Schulz inputs U, in float64."""
    m = [mu * b.double() + g.double() for b, g, mu in zip(bufs, grads, mus, strict=True)]
    u = [g.double() + mu * b if n else b for g, b, mu, n in zip(grads, m, mus, nesterov, strict=True)]
    return m, u


def _muon_check(before, after, hyper, tol):
    """Buffers as expected; (decay W_old - W_new) / alpha = NS(U) within `tol` of the float64 iteration."""
    params0, grads, bufs0 = before
    params, bufs = after
    m, u = _muon_expected(params0, grads, bufs0, *hyper)
    for k, (w0, w, b, mk, uk) in enumerate(zip(params0, params, bufs, m, u, strict=True)):
        assert relerr(b, mk) < 1e-6, k
        step = (hyper[2][k] * w0.double() - w.double()) / hyper[3][k]
        assert relerr(step, ref64(uk)) < tol, (k, tuple(w.shape))


@interpreter
def test_triton_interpreter_muon_update():
    gen = torch.Generator().manual_seed(5)
    params, grads, bufs, hyper = _muon_case("cpu", gen, [(20, 48), (50, 32), (9, 32), (20, 48)])
    before = ([p.clone() for p in params], grads, [b.clone() for b in bufs])
    table = np.array(hyper, dtype=np.float32).T
    addresses = tuple(np.array([t.data_ptr() for t in ts], dtype=np.int64) for ts in (grads, bufs, params))
    triton_ns.muon_update_triton(params, addresses, (torch.float32,) * 3, table, [NS_COEFFS] * 5,
                                 work_dtype=torch.float32, config=SMALL)  # fmt: skip
    _muon_check(before, (params, bufs), hyper, 1e-4)


def test_reference_schedule_equals_constant_coeffs():
    G = torch.randn(12, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = newton_schulz(G, 5, [NS_COEFFS] * 5, backend="reference")
    b = newton_schulz(G, 5, backend="reference")
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert relerr(newton_schulz_many([G, G.mT], 5, backend="reference")[1], b.mT) < 1e-12


def test_polar_express_schedule_tightens_singular_values():
    sched = polar_express(5)
    assert len(sched) == 5 and sched != tuple([NS_COEFFS] * 5)
    G = torch.randn(64, 160, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    lo, hi = sv_range(newton_schulz(G, 5, sched, backend="reference"))
    lo0, hi0 = sv_range(newton_schulz(G, 5, backend="reference"))
    assert 0.85 <= lo and hi <= 1.15 and hi - lo < hi0 - lo0


@pytest.mark.parametrize(
    "bad, msg",
    [
        (torch.randn(5), "must be"),
        (torch.randn(0, 4), "empty"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "non-finite"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "non-finite"),
        (torch.ones(3, 4, dtype=torch.int32), "dtype"),
    ],
)
def test_bad_input_raises(bad, msg):
    with pytest.raises(ValueError, match=msg):
        newton_schulz(bad)
    with pytest.raises(ValueError, match=msg):
        newton_schulz_many([torch.randn(3, 4), bad])


def test_muon_update_bad_input_raises():
    W = [torch.randn(4, 6)]
    with pytest.raises(ValueError, match="one entry per matrix"):
        muon_update_(W, W, W, [0.9, 0.9], [True], [1.0], [0.1])
    with pytest.raises(ValueError, match="must match"):
        muon_update_(W, [torch.randn(6, 4)], W, [0.9], [True], [1.0], [0.1])
    with pytest.raises(ValueError, match="2-D"):
        muon_update_([torch.randn(2, 4, 6)], W, W, [0.9], [True], [1.0], [0.1])


def test_bad_options_raise():
    G = torch.randn(4, 6)
    with pytest.raises(ValueError, match="schedule"):
        newton_schulz(G, 3, [NS_COEFFS] * 2)
    with pytest.raises(ValueError, match="unknown backend"):
        newton_schulz(G, backend="nope")
    with pytest.raises(ValueError, match="one dtype"):
        newton_schulz_many([G, G.double()])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            newton_schulz(G, backend="triton")
        assert not cuda.available(G.device)


# ---- CPU: compile checks --------------------------------------------------------------------------------

_COMPILE_SCRIPT = """
from tests.helpers import compile_for_hopper
from kernels.ns.triton_ns import _ns_stage_kernel
sig = {"tiles": "*i32", "meta": "*i64", "io": "*i64", "hyper": "*fp32", "g": "*fp32", "mbuf": "*fp32",
       "out": "*fp32", "x_in": "*bf16", "x_out": "*bf16", "sq": "*bf16", "u_off": "i32", "v_off": "i32",
       "d_off": "i32", "u2_off": "i32", "d2_off": "i32", "sumsq": "*fp32", "coef_a": "fp32", "coef_b": "fp32",
       "coef_c": "fp32", "eps": "fp32"}
# (stage, first, last, muon): prep, Muon's prep, the four products (first XXT and APPLY), Muon's last APPLY
for stage, first, last, muon in [(0, 0, 0, 0), (0, 0, 0, 1), (1, 1, 0, 0), (2, 1, 0, 0), (3, 1, 0, 0), (4, 0, 0, 0),
                                 (3, 0, 1, 1)]:
    k = compile_for_hopper(_ns_stage_kernel, sig, dict(STAGE=stage, FIRST=first, LAST=last, MUON=muon, SYM=True,
                           NPART=16, BM=128, BN=128, BK=64, DOT_PREC="tf32"))
    assert (stage == 0) != ("wgmma.mma_async" in k.asm["ptx"]), (stage, first)
# the fp32 tiny set: 16-wide tiles, 3-pass tf32 products on tensor cores (mma.sync)
sig.update(x_in="*fp32", x_out="*fp32", sq="*fp32")
for stage in (1, 2, 3):
    k = compile_for_hopper(_ns_stage_kernel, sig, dict(STAGE=stage, FIRST=1, LAST=0, MUON=0, SYM=True, NPART=16,
                           BM=16, BN=16 if stage < 3 else 128, BK=64 if stage < 3 else 16, DOT_PREC="tf32x3"))
    assert "mma.sync.aligned" in k.asm["ptx"] and ".tf32" in k.asm["ptx"], stage
# 16-bit, as launched (16-byte aligned arguments, Config's 8 warps and 3 stages): K loops pipelined with cp.async,
# no spills, no serialized wgmma, and at most 128 registers, so two programs share an SM (Muon's last stage 3,
# which also reads and writes W, excepted)
import os, re, subprocess, tempfile
from triton.backends.nvidia.compiler import get_ptxas


def ptxas_log(ptx):  # ptxas -v's report (registers, spills, warnings) for sm_90a, from Triton's bundled ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        return subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr


# fp16 work dtype: X_0 in bf16 (the first XXT and APPLY read it), the rest fp16
bf16 = dict(x_in="*bf16", x_out="*bf16", sq="*bf16")
fp16_x0, fp16 = dict(x_in="*bf16", x_out="*fp16", sq="*fp16"), dict(x_in="*fp16", x_out="*fp16", sq="*fp16")
for stage, first, last, muon, dts in [(1, 0, 0, 0, bf16), (2, 0, 0, 0, bf16), (3, 0, 0, 0, bf16), (4, 0, 0, 0, bf16),
                                      (1, 1, 0, 0, bf16), (3, 1, 0, 0, bf16), (3, 0, 1, 0, bf16), (3, 0, 1, 1, bf16),
                                      (1, 1, 0, 0, fp16_x0), (3, 1, 0, 0, fp16_x0), (4, 0, 0, 0, fp16),
                                      (3, 0, 1, 1, fp16)]:
    sig.update(dts)
    k = compile_for_hopper(_ns_stage_kernel, sig, dict(STAGE=stage, FIRST=first, LAST=last, MUON=muon, SYM=True,
                           NPART=16, BM=128, BN=128, BK=64, DOT_PREC="tf32"), aligned=True, num_warps=8, num_stages=3)
    assert "cp.async" in k.asm["ptx"], (stage, first, last, muon)
    log = ptxas_log(k.asm["ptx"])
    regs = int(re.search(r"Used (\\d+) registers", log).group(1))
    assert "Performance Loss" not in log and " 0 bytes spill stores" in log, log
    assert muon or regs <= 128, (stage, first, last, regs)
# the Gluon kernel of the [m, m] stages (POLY, PRODUCT), bf16 and fp16: warp-specialized (setmaxnreg), wgmma,
# within the H100's 227 KB of shared memory per block, no spills
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon import language as gl
from triton.backends.compiler import GPUTarget
import triton
from kernels.ns import gluon_products as G
for dt, name in ((gl.bfloat16, "bf16"), (gl.float16, "fp16")):
    a_layout = gl.NVMMASharedLayout.get_default_for([G.BM, G.BK], dt)
    c_layout = gl.NVMMASharedLayout.get_default_for([1, G.BM, G.BM], dt)
    for poly in (True, False):
        gsig = {"a_desc": f"tensordesc<{name}[{G.BM},{G.BK}],{a_layout!r}>",
                "c_desc": f"tensordesc<{name}[1,{G.BM},{G.BM}],{c_layout!r}>", "tiles": "*i32", "T": "i32", "K": "i32",
                "u": "i32", "v": "i32", "d": "i32", "u2": "i32", "d2": "i32", "coef_a": "fp32", "coef_b": "fp32",
                "coef_c": "fp32"}
        consts = dict(IS_POLY=poly, MROWS=576, KSTEPS=9, NSLOT=G.NB, num_warps=G.CONSUMER_WARPS)
        gsig.update({c: "constexpr" for c in consts})
        k = triton.compile(GluonASTSource(G._sym_products_kernel, gsig, consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": G.CONSUMER_WARPS})
        ptx = k.asm["ptx"]
        assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx and k.metadata.shared <= 227 * 1024, (name, poly)
        log = ptxas_log(ptx)
        assert " 0 bytes spill stores" in log, log
print("ok")
"""


@pytest.mark.slow
def test_triton_compiles_for_sm90():
    # helper @jit functions cannot be compiled from their interpreter wrappers: compile in a fresh process
    assert "ok" in run_without_interpreter(_COMPILE_SCRIPT, timeout=None)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_compiles_for_sm90a(tmp_path):
    r = subprocess.run(
        ["nvcc", "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "ns.cubin"),
         str(cuda.SOURCE)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for kernel in ("ns_sym", "ns_sym_full", "ns_gemm"):
        assert f"'{kernel}'" in r.stderr
    assert all(" 0 bytes spill" in line for line in r.stderr.splitlines() if "spill" in line)


# ---- GPU ------------------------------------------------------------------------------------------------

# (stack size, m, n) covering every kind of 95m Muon shape: wide, tall, square, tiny, [3024, 4]
GPU_SHAPES = [(4, 576, 1536), (2, 3024, 576), (3, 1008, 576), (2, 576, 576), (2, 9, 576), (2, 3024, 4), (2, 192, 192)]


def _spread(G: torch.Tensor) -> bool:
    """Rectangular enough (aspect >= 1.5) that a Gaussian G has no near-zero singular value: 5 quintic
    steps lift a normalized singular value s only to about 3.44^5 s, so square random matrices, whose
    smallest singular value is ~0, keep one far below 0.6 in every implementation."""
    return max(G.shape[-2:]) >= 1.5 * min(G.shape[-2:])


def _poison_cache():
    """Leave NaNs in the caching allocator's free blocks, so an unwritten output element shows up."""
    torch.full((1 << 26,), float("nan"), device="cuda")
    torch.cuda.synchronize()


def _gpu_inputs(dtype=torch.float32):
    gen = torch.Generator(device="cuda").manual_seed(7)
    return [torch.randn(N, m, n, device="cuda", generator=gen, dtype=dtype) for N, m, n in GPU_SHAPES]


@pytest.mark.gpu
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_bf16(in_dtype):
    Gs = _gpu_inputs(in_dtype)
    _poison_cache()
    outs = newton_schulz_many(Gs, 5)
    for G, X in zip(Gs, outs, strict=True):
        assert X.shape == G.shape and X.dtype == G.dtype
        R = ref64(G)
        assert relerr(X, R) < 2e-2, G.shape
        for b in range(G.shape[0] if _spread(G) else 0):
            lo, hi = sv_range(X[b])
            assert 0.6 <= lo and hi <= 1.25, (G.shape, lo, hi)
        _poison_cache()
        single = newton_schulz(G, 5, backend="triton")
        assert torch.equal(single, X), G.shape  # one stack alone == the same stack among all groups
        assert torch.equal(newton_schulz(G[1], 5, backend="triton"), X[1])  # a matrix alone == in its stack
    # the second call replays the captured CUDA graph; eager launches give the same bits
    for X, Y, Z in zip(
        outs, newton_schulz_many(Gs, 5), triton_ns.newton_schulz_triton(Gs, [NS_COEFFS] * 5, graphs=False), strict=True
    ):
        assert torch.equal(X, Y) and torch.equal(X, Z)


@pytest.mark.gpu
def test_gpu_triton_fp32_and_no_symmetry():
    Gs = _gpu_inputs()
    outs = triton_ns.newton_schulz_triton(Gs, [NS_COEFFS] * 5, work_dtype=torch.float32)
    full = triton_ns.newton_schulz_triton(Gs, [NS_COEFFS] * 5, sym=False)
    for G, X, F in zip(Gs, outs, full, strict=True):
        assert relerr(X, ref64(G)) < 1e-4, G.shape
        assert relerr(F, ref64(G)) < 2e-2, G.shape
    sched = list(polar_express(5))
    for G, X in zip(Gs, newton_schulz_many(Gs, 5, sched), strict=True):
        # the schedule's steep early quintics (slope ~10 near the top of their interval) amplify bf16
        # rounding when a matrix has only a few, similar singular values: 6.6e-2 measured for 9 x 576
        assert relerr(X, ref64(G, sched)) < (2e-2 if min(G.shape[-2:]) >= 64 else 1e-1), G.shape
        lo, hi = sv_range(X[0])
        assert hi <= 1.2 and (0.8 <= lo or not _spread(G)), (G.shape, lo, hi)


@pytest.mark.gpu
def test_gpu_gram_form_decaying_spectrum():
    """A 1/i spectrum puts most singular values of X below bf16's resolution of R = X X^T, so R carries
    rounding noise as small negative eigenvalues, which the Gram form's updates of R amplify. With its
    default segments it must stay as accurate as the plain iteration (3e-2 for both on the H100; segments
    of 3 + 2 steps gave 30, with singular values up to 279)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    plain = dataclasses.replace(triton_ns.Config(), gram_aspect=float("inf"))
    for m, n in [(576, 1536), (3024, 576)]:
        k = min(m, n)
        U = torch.linalg.qr(torch.randn(2, m, k, device="cuda", generator=gen))[0]
        V = torch.linalg.qr(torch.randn(2, n, k, device="cuda", generator=gen))[0]
        G = U @ torch.diag_embed(1.0 / torch.arange(1, k + 1, device="cuda")) @ V.mT
        X = newton_schulz_many([G], 5)[0]  # the Gram form: n >= 2.5 m
        P = triton_ns.newton_schulz_triton([G], [NS_COEFFS] * 5, config=plain)[0]
        R = ref64(G)
        assert relerr(X, R) < max(5e-2, 1.5 * relerr(P, R)), (m, n, relerr(X, R), relerr(P, R))
        assert sv_range(X[0])[1] <= 1.25, (m, n)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="the Gluon kernel is sm_90"
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gluon_products_equal_triton(dtype, monkeypatch):
    """The [m, m] stages by the Gluon kernel (the Gram-form set: one m) give the Triton stages' bits: same tiles,
    same K order, same epilogue."""
    Gs = [G for G in _gpu_inputs() if triton_ns.gram_form(G.shape[-2:], triton_ns.Config())]
    assert Gs and triton_ns.Config().gluon
    off = dataclasses.replace(triton_ns.Config(), gluon=False)
    monkeypatch.setattr(triton_ns, "_CALLS", {})
    on = triton_ns.newton_schulz_triton(Gs, [NS_COEFFS] * 5, work_dtype=dtype)
    (call,) = triton_ns._CALLS.values()
    assert call.runners[0].gluon is not None  # (the Gram-form set ran the Gluon kernel)
    ref = triton_ns.newton_schulz_triton(Gs, [NS_COEFFS] * 5, work_dtype=dtype, config=off)
    for X, Y in zip(on, ref, strict=True):
        assert torch.equal(X, Y), X.shape


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e5])
def test_gpu_fp16_work_dtype(scale):
    """fp16 operands (Gram segments of 3 + 2 steps): X_0 = G is stored before the normalization, in bf16, so
    gradients far outside fp16's range (6e-8 to 65504) orthogonalize as well (H100: 6.6e-3 at most)."""
    Gs = [scale * G for G in _gpu_inputs()]
    outs = triton_ns.newton_schulz_triton(Gs, [NS_COEFFS] * 5, work_dtype=torch.float16)
    for G, X in zip(Gs, outs, strict=True):
        tol = 1e-2 if min(G.shape[-2:]) > triton_ns.TINY else 1e-4  # (tiny sides: fp32 operands)
        assert relerr(X, ref64(G)) < tol, (G.shape, relerr(X, ref64(G)))


@pytest.mark.gpu
@pytest.mark.skipif(cuda.cupy is None, reason="cupy not installed")
def test_gpu_cuda_backend():
    for G in _gpu_inputs():
        _poison_cache()
        X = newton_schulz(G, 5, backend="cuda")
        assert X.shape == G.shape and X.dtype == G.dtype
        assert relerr(X, ref64(G)) < 2e-2, G.shape
        lo, hi = sv_range(X[0])
        assert hi <= 1.25 and (0.6 <= lo or not _spread(G)), (G.shape, lo, hi)
        # torch's norm reduction (on the way into the bf16 workspace) is not batch-invariant, so a
        # matrix alone may round a few X_0 entries differently than in its stack: close, not equal
        assert relerr(newton_schulz(G[1], 5, backend="cuda"), X[1]) < 1e-2
        if min(G.shape[-2:]) > cuda.TINY:  # (tiny sides went to the fp32 reference above)
            F = cuda.newton_schulz_cuda(G, [NS_COEFFS] * 5, sym=False)
            assert relerr(F, X) < 1e-2


@pytest.mark.gpu
def test_gpu_muon_update_fused():
    # the 95m model's Muon shapes (one of each, the 9 x 576 one in the fp32 tiny set) plus a second 576 x 1536
    gen = torch.Generator(device="cuda").manual_seed(11)
    shapes = [(576, 1536), (1536, 576), (3024, 576), (576, 1008), (9, 576), (192, 576), (576, 576), (192, 192)]
    params, grads, bufs, hyper = _muon_case("cuda", gen, shapes)
    assert all(triton_ns.muon_addresses(ts) is not None for ts in (params, grads, bufs))
    for _ in range(2):  # the second call replays the captured graph
        before = ([p.clone() for p in params], [g.clone() for g in grads], [b.clone() for b in bufs])
        muon_update_(params, grads, bufs, *hyper)
        _muon_check(before, (params, bufs), hyper, 2e-2)
        grads = [torch.randn(g.shape, generator=gen, device="cuda") for g in grads]
    # a non-contiguous gradient takes the unfused path (foreach ops + newton_schulz_many): same result
    W = [p.clone() for p in params[:2]]
    M1, M2 = [b.clone() for b in bufs[:2]], [b.clone() for b in bufs[:2]]
    G = [grads[0], grads[1].T.contiguous().T]
    assert triton_ns.muon_addresses(G) is None
    W2 = [p.clone() for p in W]
    muon_update_(W, grads[:2], M1, *[h[:2] for h in hyper])
    muon_update_(W2, G, M2, *[h[:2] for h in hyper])
    for a, b in zip(W + M1, W2 + M2, strict=True):
        assert relerr(a, b) < 1e-5
