"""Benchmark of the CSA attention core and the whole CSA layer on one GPU, in one run.

Variants, all bf16, layout [B, T, H, D] unless said otherwise:
  ours        kernels.csa.csa_attention(backend="triton"): fused forward, two-launch backward, eager autograd
              through the C++ node (kernels/csa/node.py)
  ours_python the same kernels through the Python autograd.Function (the node turned off)
  flex        FlexAttention composition, compiled static per shape: sliding-window block mask over the raw
              keys plus a visibility block mask over the compressed keys, rows t < 4 zeroed, blended with
              lerp. Given [B, H, T, D] inputs (its native layout, no transposes timed): the generous setting.
  reference   kernels/csa/reference.py (PyTorch, fp32 compute)
  sdpa_full   F.scaled_dot_product_attention(is_causal=True, enable_gqa=True): full causal attention, the
              yard stick; the fastest of the default dispatch, flash and cuDNN is reported
Forward and forward+backward medians (CUDA events, warm-up, >= 20 reps, inputs rotated over two sets),
tokens/s and the fraction of a roofline (useful FLOPs over the measured bf16 matmul rate, ideal bytes
over the measured copy bandwidth, whichever is larger). Also: a tile-config sweep at B 16 and 64 (the
best is kept for the rest of the run; --no-sweep keeps kernels/csa's defaults), the T 1024 rows again with
every thread of the process on one CPU (`one_cpu`), GPU-only times from CUDA graphs, host microseconds per
call of each piece of the eager step, and the whole CSA layer (projections
included): ours (fused attention and compressor) vs ours with the PyTorch compressor vs the reference, eager
and torch.compile'd, and the compressor alone: fused vs PyTorch eager vs PyTorch compiled.

    python bench/csa.py --out profiles            # writes csa.json and csa.md there
    python bench/csa.py --profile --out DIR       # host cProfile tables and per-kernel GPU times only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.csa as csa  # noqa: E402
from kernels import common  # noqa: E402
from kernels.csa import node, reference, triton_csa  # noqa: E402

H, HKV, D, STRIDE, WINDOW = 9, 3, 64, 4, 64
SCALE = D**-0.5
DT = torch.bfloat16


def bench(fn, reps: int = 30, warmup: int = 5, calls: int = 1) -> float:
    """Median milliseconds per call of fn(i) (i rotates the input set): CUDA events around `calls`
    back-to-back calls. calls=1 is the latency of one call, CPU launch cost included; calls=10 lets the
    CPU run ahead as in a training step, so a GPU-bound variant shows its GPU time."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for r in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for c in range(calls):
            fn(r * calls + c)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def kernel_stats() -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of our kernels (compiler report)."""
    stats = []
    for name in ("_csa_fwd", "_csa_bwd_dq", "_csa_bwd_dkv"):
        try:
            for entry in getattr(triton_csa, name).device_caches.values():
                for key, ck in entry[0].items():
                    stats.append(
                        {
                            "kernel": name,
                            "n_regs": ck.n_regs,
                            "n_spills": ck.n_spills,
                            "shared": ck.metadata.shared,
                            "num_warps": ck.metadata.num_warps,
                            "num_stages": ck.metadata.num_stages,
                            "key": str(key)[-160:],
                        }
                    )
        except Exception as e:  # the cache layout differs between Triton versions
            stats.append({"kernel": name, "error": repr(e)[:200]})
    return stats


def ceilings() -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate, measured here."""
    x = torch.randn(2**28, device="cuda", dtype=DT)  # 512 MiB
    y = torch.empty_like(x)
    ms = bench(lambda i: y.copy_(x), reps=20)
    bw = 2 * x.numel() * x.element_size() / ms / 1e9  # TB/s
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=DT) for _ in range(2))
    ms_mm = bench(lambda i: a @ b, reps=20)
    return {"copy_TBps": bw, "bf16_matmul_TFLOPs": 2 * 8192**3 / ms_mm / 1e9}


def inputs(B: int, T: int, seed: int, requires_grad: bool = True) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    Tc = -(-T // STRIDE)
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=DT, generator=g)
    xs = [rnd(B, T, H, D), rnd(B, T, HKV, D), rnd(B, T, HKV, D), rnd(B, Tc, HKV, D), rnd(B, Tc, HKV, D)]
    xs.append(torch.rand(B, T, H * D, device="cuda", generator=g).to(DT))
    return [x.requires_grad_(requires_grad) for x in xs]


def to_bhtd(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """[B, T, H, D] -> contiguous [B, H, T, D] leaves (blend too), for flex and SDPA."""
    B, T = xs[0].shape[:2]
    out = [x.detach().transpose(1, 2).contiguous() for x in xs[:5]]
    out.append(xs[5].detach().view(B, T, H, D).transpose(1, 2).contiguous())
    return [x.requires_grad_() for x in out]


def make_flex(T: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    Tc = -(-T // STRIDE)
    local_mask = create_block_mask(lambda b, h, q, kv: (kv <= q) & (kv > q - WINDOW), None, None, T, T, device="cuda")
    comp_mask = create_block_mask(lambda b, h, q, kv: q >= STRIDE * (kv + 1), None, None, T, Tc, device="cuda")
    has_block = (torch.arange(T, device="cuda") >= STRIDE)[:, None]

    def flex_csa(q, k, v, kc, vc, blend):
        local = flex_attention(q, k, v, block_mask=local_mask, scale=SCALE, enable_gqa=True)
        comp = flex_attention(q, kc, vc, block_mask=comp_mask, scale=SCALE, enable_gqa=True)
        comp = torch.where(has_block, comp, 0.0)  # rows t < 4: no visible block, comp = 0 by definition
        return torch.lerp(local, comp, blend)

    return torch.compile(flex_csa, fullgraph=True, dynamic=False)  # one static compile per shape: its best


def sdpa_variants():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(backends, q, k, v):
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)

    all_backends = [
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ]
    return {
        "default": partial(run, all_backends),
        "flash": partial(run, [SDPBackend.FLASH_ATTENTION]),
        "cudnn": partial(run, [SDPBackend.CUDNN_ATTENTION]),
    }


def useful_flops(B: int, T: int, kind: str) -> float:
    """Forward FLOPs of the unmasked score/value products (2 matmuls x 2 FLOPs per MAC)."""
    t = torch.arange(T, dtype=torch.float64)
    keys = (t // STRIDE + torch.clamp(t + 1, max=WINDOW)) if kind == "csa" else t + 1
    return 4.0 * D * H * B * keys.sum().item()


def ideal_bytes(B: int, T: int, fwdbwd: bool) -> float:
    """Each input read once, each output written once (bf16); fwd+bwd adds dO, the saved lse and all grads."""
    Tc = -(-T // STRIDE)
    q_like, kv_like, kc_like = B * T * H * D, B * T * HKV * D, B * Tc * HKV * D
    fwd = 2 * (3 * q_like + 2 * kv_like + 2 * kc_like)  # q, blend, o; k, v; kc, vc
    if not fwdbwd:
        return fwd
    return fwd + 2 * (3 * q_like + 2 * kv_like + 2 * kc_like) + 2 * 4 * B * H * T  # do, dq, dblend; grads; lse


def relerrs(out, grads, ref, ref_grads):
    from tests.helpers import relerr

    return relerr(out, ref), max(relerr(g, r) for g, r in zip(grads, ref_grads, strict=True))


def check_accuracy(B: int, T: int, flex_fn) -> dict:
    """ours and flex vs the float64 reference (computed on the GPU), forward and worst gradient."""
    xs = inputs(B, T, seed=123)
    do = torch.randn(B, T, H, D, device="cuda", dtype=DT)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    ref = reference.csa_attention(*x64)
    ref_grads = torch.autograd.grad(ref, x64, do.double())
    out = csa.csa_attention(*xs, backend="triton")
    res = {"ours": relerrs(out, torch.autograd.grad(out, xs, do), ref, ref_grads)}
    xf = to_bhtd(xs)
    outf = flex_fn(*xf).transpose(1, 2)
    gf = torch.autograd.grad(outf, xf, do)
    gf = [g.transpose(1, 2) for g in gf[:5]] + [gf[5].transpose(1, 2).reshape(B, T, H * D)]
    res["flex"] = relerrs(outf, gf, ref, ref_grads)
    return {k: {"fwd": a, "bwd": b} for k, (a, b) in res.items()}


def time_variant(fwd, sets, do, calls: int) -> dict:
    """fwd and fwd+bwd ms of fwd(*inputs), inputs rotated over `sets`: `calls` back-to-back per sample
    (the headline numbers) and single calls (latency, CPU launch cost included)."""
    step = lambda i: torch.autograd.grad(fwd(*sets[i % len(sets)]), sets[i % len(sets)], do, allow_unused=True)
    with torch.no_grad():
        t_f = bench(lambda i: fwd(*sets[i % len(sets)]), calls=calls)
        t_f1 = bench(lambda i: fwd(*sets[i % len(sets)]))
    return {
        "fwd_ms": t_f,
        "fwdbwd_ms": bench(step, calls=calls),
        "fwd_latency_ms": t_f1,
        "fwdbwd_latency_ms": bench(step),
    }


def sweep_configs(shapes=((16, 1024), (64, 1024)), options: dict | None = None) -> dict:
    """Time a few tile configs per kernel at each shape (each checked against the fp64 reference first);
    keep the one with the least total time. An option is a dict of overrides of kernels/csa's defaults
    (triton_csa.CONFIG). Kernels are swept in order (fwd, bwd_dq, bwd_dkv), each with the best of the
    previous ones; bwd_* configs are timed as the whole backward."""
    # the defaults, and the forward's previous compressed-key tile (earlier sweeps and A/B runs: csa.md)
    options = options or {"fwd": [{}, {"BLOCK_N": 32}], "bwd_dq": [{}], "bwd_dkv": [{}]}
    sets = {}
    for B, T in shapes:
        xs = [x.detach() for x in inputs(B, T, seed=7)]
        sets[f"B{B}_T{T}"] = (xs, torch.randn(B, T, H, D, device="cuda", dtype=DT))
    small = inputs(2, 333, seed=8)
    dsmall = torch.randn(2, 333, H, D, device="cuda", dtype=DT)
    x64 = [x.detach().double().requires_grad_() for x in small]
    ref = reference.csa_attention(*x64)
    ref_grads = torch.autograd.grad(ref, x64, dsmall.double())
    report = {}
    for name, opts in options.items():
        results = []
        default = dict(triton_csa.CONFIG[name])
        for over in opts:
            opt = triton_csa.CONFIG[name] = {**default, **over}
            try:
                out = csa.csa_attention(*small, backend="triton")
                ef, eb = relerrs(out, torch.autograd.grad(out, small, dsmall), ref, ref_grads)
                ms = {}
                for shape, (xs, do) in sets.items():
                    saved = triton_csa.csa_fwd(*xs, WINDOW, STRIDE, SCALE, True)
                    if name == "fwd":
                        fn = lambda i, xs=xs: triton_csa.csa_fwd(*xs, WINDOW, STRIDE, SCALE, False)
                    else:
                        fn = lambda i, xs=xs, s=saved, do=do: triton_csa.csa_bwd(do, *xs, *s, WINDOW, STRIDE, SCALE)
                    ms[shape] = bench(fn, calls=10)
            except Exception as e:  # a config that does not compile (resources) is skipped, and reported
                results.append({"cfg": opt, "error": repr(e)[:200]})
                continue
            ok = ef < 5e-3 and eb < 1e-2
            results.append({"cfg": opt, "ms": ms, "total_ms": sum(ms.values()), "relerr_fwd": ef, "relerr_bwd": eb,
                            "ok": ok})
        best = min((r for r in results if r.get("ok")), key=lambda r: r["total_ms"])
        triton_csa.CONFIG[name] = best["cfg"]
        report[name] = {"best": best["cfg"], "tried": results}
        print(f"sweep {name}:", flush=True)
        for r in results:
            print("   ", tuple(r["cfg"].values()), {k: round(v, 4) for k, v in r.get("ms", {}).items()},
                  r.get("error", ""), flush=True)
    return report


def layer_bench(B: int, T: int, compiled: bool = False) -> dict:
    """The model's CSA layer (projections included), fwd+bwd: ours (fused attention and compressor), ours
    with the PyTorch compressor, and the reference (PyTorch attention and compressor); then the compressor
    alone: PyTorch eager, PyTorch under torch.compile, fused (is the fused compressor the faster?)."""
    from model import model as model_mod
    from model.config import HylaConfig

    cfg = HylaConfig()
    module = model_mod.CSA(cfg).cuda().to(DT)
    layer = torch.compile(module, fullgraph=True) if compiled else module
    cos, sin = (t.cuda() for t in model_mod.rope_tables(torch.arange(T), cfg.rotary_dim, cfg.rope_theta))
    xs = [torch.randn(B, T, cfg.dim, device="cuda", dtype=DT, requires_grad=True) for _ in range(2)]
    dy = torch.randn(B, T, cfg.dim, device="cuda", dtype=DT)
    params = list(module.parameters())
    core, compressor = model_mod.csa_attention, model_mod.compress_kv
    variants = {"ours": ("triton", "triton"), "reference": ("reference", "reference")}
    if not compiled:  # (under torch.compile "auto" traces the PyTorch compressor anyway)
        variants["ours_pytorch_compressor"] = ("triton", "reference")
    res = {}
    try:
        for name, (attn_backend, comp_backend) in variants.items():
            model_mod.csa_attention = partial(csa.csa_attention, backend=attn_backend)
            model_mod.compress_kv = partial(csa.compress_kv, backend="auto" if compiled else comp_backend)
            step = lambda i: torch.autograd.grad(layer(xs[i % 2], (cos, sin)), [xs[i % 2], *params], dy)
            res[f"{name}_fwdbwd_ms"] = bench(step, reps=20, calls=5)
            with torch.no_grad():
                res[f"{name}_fwd_ms"] = bench(lambda i: layer(xs[i % 2], (cos, sin)), reps=20, calls=5)
    finally:
        model_mod.csa_attention, model_mod.compress_kv = core, compressor
    if compiled:
        return res
    k_raw = torch.randn(B, T, HKV, D, device="cuda", dtype=DT, requires_grad=True)
    v = torch.randn(B, T, HKV, D, device="cuda", dtype=DT, requires_grad=True)
    wk, wv = module.compress_k.weight, module.compress_v.weight
    dkc = torch.randn(B, -(-T // STRIDE), HKV, D, device="cuda", dtype=DT)
    pytorch = partial(csa.compress_kv, backend="reference")
    compressors = {
        "pytorch_eager": pytorch,
        "pytorch_compiled": torch.compile(pytorch, fullgraph=True),
        "fused": partial(csa.compress_kv, backend="triton"),
    }
    for name, fn in compressors.items():
        comp_step = lambda i, fn=fn: torch.autograd.grad(
            sum((o * dkc).sum() for o in fn(k_raw, v, wk, wv)), [k_raw, v, wk, wv]
        )
        res[f"compressor_{name}_fwdbwd_ms"] = bench(comp_step, reps=20, calls=5)
        with torch.no_grad():
            res[f"compressor_{name}_fwd_ms"] = bench(lambda i, fn=fn: fn(k_raw, v, wk, wv), reps=20, calls=5)
    return res


def python_path(fn):
    """fn with the C++ autograd node turned off: its calls take the Python autograd.Function."""

    def call(*args, **kwargs):
        node.ENABLED = False
        try:
            return fn(*args, **kwargs)
        finally:
            node.ENABLED = True

    return call


def graph_ms(step) -> float:
    """Per-call GPU time of step() replayed from a CUDA graph (no CPU launch cost at all)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return bench(lambda i: graph.replay(), calls=10)


def cpu_issue_us(step, n: int = 30, repeats: int = 3) -> float:
    """Host microseconds per call of issuing step() (the GPU queue absorbs the work; one sync at the end of
    each of `repeats` rounds of n calls; the median round)."""
    step()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            step()
        rounds.append((time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(rounds)


class _Passthrough(torch.autograd.Function):
    """The cheapest autograd.Function with our op's inputs: the floor of the eager autograd cost."""

    @staticmethod
    def forward(ctx, q, k, v, kc, vc, blend):
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, do):
        return do, None, None, None, None, None


@contextlib.contextmanager
def one_cpu():
    """Every thread of this process, and those it starts inside, on one CPU (the last of its affinity set);
    the previous affinities are restored after. On the GPU machines' virtual CPUs this cut the host cost
    of an eager step by 30-50% for every variant in the runs of profiles/csa.md."""
    tids = [int(t) for t in os.listdir("/proc/self/task")]
    before = {}
    for t in tids:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            before[t] = os.sched_getaffinity(t)
    cpu = max(os.sched_getaffinity(0))
    for t in before:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(t, {cpu})
    try:
        yield cpu
    finally:
        for t in [int(t) for t in os.listdir("/proc/self/task")]:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(t, before.get(t, before[tids[0]]))


def graph_rows(B: int, flex_fn, sdpa: dict) -> list[dict]:
    """GPU-only times (CUDA graphs) of ours, flex and SDPA (default dispatch and cuDNN) at T 1024, and host
    microseconds per call of the pieces of each eager fwd+bwd step, with the threads free to move and on
    one CPU (interleaved rounds)."""
    rows = []
    xs = inputs(B, 1024, seed=1)
    xf = to_bhtd(xs)
    do = torch.randn(B, 1024, H, D, device="cuda", dtype=DT)
    dof = do.transpose(1, 2).contiguous()
    # host costs first: before any CUDA graph capture, as in a training step
    x0 = [x.detach() for x in xs]
    saved = triton_csa.csa_fwd(*x0, WINDOW, STRIDE, SCALE, True)
    step = lambda: torch.autograd.grad(csa.csa_attention(*xs), xs, do)
    host = {"variant": "host_us", "B": B, "T": 1024}
    host["ours_fwd_launcher"] = cpu_issue_us(lambda: triton_csa.csa_fwd(*x0, WINDOW, STRIDE, SCALE, True))
    host["ours_bwd_launcher"] = cpu_issue_us(lambda: triton_csa.csa_bwd(do, *x0, *saved, WINDOW, STRIDE, SCALE))
    host["ours_fwd_with_grad"] = cpu_issue_us(lambda: csa.csa_attention(*xs))
    common.FAST_LAUNCH = False
    try:
        host["ours_step_triton_jit_launch"] = cpu_issue_us(step)
    finally:
        common.FAST_LAUNCH = True
    steps = {
        "ours_step": step,
        "ours_python_step": python_path(step),
        "passthrough_function_step": lambda: torch.autograd.grad(_Passthrough.apply(*xs), xs, do, allow_unused=True),
        "flex_step": lambda: torch.autograd.grad(flex_fn(*xf), xf, dof),
        "sdpa_step": lambda: torch.autograd.grad(sdpa["default"](*xf[:3]), xf[:3], dof),
        "sdpa_cudnn_step": lambda: torch.autograd.grad(sdpa["cudnn"](*xf[:3]), xf[:3], dof),
    }
    rounds = {}
    for _ in range(3):  # alternate free and one-CPU rounds: the host's state drifts
        for name, fn in steps.items():
            rounds.setdefault(name, []).append(cpu_issue_us(fn))
        with one_cpu():
            for name, fn in steps.items():
                rounds.setdefault(f"{name}_one_cpu", []).append(cpu_issue_us(fn))
    host.update({name: statistics.median(v) for name, v in rounds.items()})
    print({k: round(v, 1) if isinstance(v, float) else v for k, v in host.items()}, flush=True)
    variants = {
        "ours": (lambda: csa.csa_attention(*xs, backend="triton"), xs, do),
        "flex": (lambda: flex_fn(*xf), xf, dof),
        "sdpa_full_default": (lambda: sdpa["default"](*xf[:3]), xf[:3], dof),
        "sdpa_full_cudnn": (lambda: sdpa["cudnn"](*xf[:3]), xf[:3], dof),
    }
    for name, (fwd, leaves, g) in variants.items():
        row = {"variant": name, "B": B, "T": 1024}
        try:
            with torch.no_grad():
                row["fwd_graph_ms"] = graph_ms(fwd)
            row["fwdbwd_graph_ms"] = graph_ms(lambda f=fwd, x=leaves, g=g: torch.autograd.grad(f(), x, g))
        except Exception as e:  # capture not supported by a variant
            row["error"] = repr(e)[:300]
        rows.append(row)
        print(row, flush=True)
    return [*rows, host]


def graph_mode(out_dir: Path, meta: dict) -> None:
    flex_fn, sdpa = make_flex(1024), sdpa_variants()
    rows = [r for B in (16, 64) for r in graph_rows(B, flex_fn, sdpa)]
    (out_dir / "csa_graphs.json").write_text(json.dumps({**meta, "graph_rows": rows}, indent=1, default=str))


def profile_batch(B: int, flex_fn, sdpa, report: dict) -> None:
    """Host microseconds per call of each piece at batch B, cProfile tables, per-kernel GPU times."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    xs = inputs(B, 1024, seed=1)
    x0 = [x.detach() for x in xs]
    xf = to_bhtd(xs)
    do = torch.randn(B, 1024, H, D, device="cuda", dtype=DT)
    dof = do.transpose(1, 2).contiguous()
    saved = triton_csa.csa_fwd(*x0, WINDOW, STRIDE, SCALE, True)
    pieces = {
        "empty": lambda: torch.empty(B, 1024, H, D, device="cuda", dtype=DT),
        "csa_fwd_nosave": lambda: triton_csa.csa_fwd(*x0, WINDOW, STRIDE, SCALE, False),
        "csa_fwd_save": lambda: triton_csa.csa_fwd(*x0, WINDOW, STRIDE, SCALE, True),
        "csa_bwd": lambda: triton_csa.csa_bwd(do, *x0, *saved, WINDOW, STRIDE, SCALE),
        "csa_attention_grad_fwd": lambda: csa.csa_attention(*xs),
        "step_ours": lambda: torch.autograd.grad(csa.csa_attention(*xs), xs, do),
        "step_flex": lambda: torch.autograd.grad(flex_fn(*xf), xf, dof),
        "step_sdpa": lambda: torch.autograd.grad(sdpa(*xf[:3]), xf[:3], dof),
    }
    host = {name: cpu_issue_us(fn, n=30) for name, fn in pieces.items()}
    report["host_us"][f"B{B}"] = host
    print(B, {k: round(v, 1) for k, v in host.items()}, flush=True)
    for name in ("csa_attention_grad_fwd", "csa_bwd", "step_ours"):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            pieces[name]()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        report["cprofile"][f"B{B}_{name}"] = s.getvalue()[-4000:]
    torch.cuda.synchronize()
    for name in ("step_ours", "step_flex", "step_sdpa"):
        for _ in range(3):
            pieces[name]()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                pieces[name]()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
        report["kernels"][f"B{B}_{name}"] = table
        print(f"== B{B} {name}\n{table}", flush=True)


def launch_cost_us() -> dict:
    """Host microseconds of one Triton launch as a function of the argument count (a kernel that
    only writes one element), to tell launch overhead from our own Python around it."""
    import triton
    import triton.language as tl

    @triton.jit
    def few(X, a, b, N: tl.constexpr):
        tl.store(X, a + b + N)

    @triton.jit
    def many(X, Y, Z, W, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9,
             c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, N: tl.constexpr, M: tl.constexpr):
        tl.store(X, a0 + a9 + b0 + c9 + N + M)

    x = torch.zeros(4, device="cuda", dtype=torch.int32)
    ints = list(range(16, 46))
    out = {
        "few_args": cpu_issue_us(lambda: few[(1,)](x, 3, 5, N=2), n=200),
        "many_args": cpu_issue_us(lambda: many[(1,)](x, x, x, x, *ints, N=2, M=3), n=200),
        "torch_empty": cpu_issue_us(lambda: torch.empty(1024, device="cuda"), n=200),
    }
    print("launch cost us", out, flush=True)
    return out


def profile_mode(out_dir: Path, meta: dict) -> None:
    """Where the time goes: host microseconds per call of each piece of our eager path (cProfile tables
    of the forward and the backward launcher), and per-kernel GPU times from torch.profiler."""
    report = {**meta, "host_us": {}, "cprofile": {}, "kernels": {}, "launch_us": launch_cost_us()}
    flex_fn, sdpa = make_flex(1024), sdpa_variants()["default"]
    for B in (16, 64):
        profile_batch(B, flex_fn, sdpa, report)
    print(report["cprofile"]["B16_csa_bwd"], flush=True)
    print(report["cprofile"]["B16_step_ours"], flush=True)
    (out_dir / "csa_profile.json").write_text(json.dumps(report, indent=1, default=str))

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="profiles")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--graphs", action="store_true", help="only the CUDA-graph GPU times and host costs")
    ap.add_argument("--profile", action="store_true", help="only the host-time and per-kernel breakdown")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    t0 = time.time()
    meta = {
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
        "command": "python " + " ".join(sys.argv),
    }
    if args.graphs or args.profile:
        meta["config"] = triton_csa.CONFIG
        (profile_mode if args.profile else graph_mode)(out_dir, meta)
        return
    meta["ceilings"] = ceil = ceilings()
    print(meta, flush=True)
    if not args.no_sweep:
        meta["sweep"] = sweep_configs()
    meta["config"] = triton_csa.CONFIG
    meta["kernel_stats"] = kernel_stats()

    rows, accuracy, flex_fns = [], {}, {}
    sdpa = sdpa_variants()
    for B, T in ((16, 1024), (64, 1024), (16, 4096)):
        flex_fn = flex_fns[T] = flex_fns.get(T) or make_flex(T)
        if B == 16:
            # at the timed shape (flex compiles per shape), B 2 at T 4096 (the fp64 reference's memory)
            accuracy[f"B{B}_T{T}"] = check_accuracy(2 if T == 4096 else B, T, flex_fn)
            print("accuracy", T, accuracy[f"B{B}_T{T}"], flush=True)
        sets = [inputs(B, T, seed=s) for s in range(2)]
        do = torch.randn(B, T, H, D, device="cuda", dtype=DT)
        flex_sets = [to_bhtd(s) for s in sets]
        do_bhtd = do.transpose(1, 2).contiguous()
        variants = {
            "ours": (partial(csa.csa_attention, backend="triton"), sets, do, "csa"),
            "ours_python": (python_path(partial(csa.csa_attention, backend="triton")), sets, do, "csa"),
            "flex": (flex_fn, flex_sets, do_bhtd, "csa"),
            "reference": (partial(csa.csa_attention, backend="reference"), sets, do, "csa"),
        }
        for name, fn in sdpa.items():
            variants[f"sdpa_full_{name}"] = (lambda q, k, v, kc, vc, bl, fn=fn: fn(q, k, v), flex_sets, do_bhtd, "full")
        for name, (fn, s, g, kind) in variants.items():
            row = {"variant": name, "B": B, "T": T}
            try:
                row.update(time_variant(fn, s, g, calls=1 if name == "reference" else 10))
                t_f, t_fb = row["fwd_ms"], row["fwdbwd_ms"]
            except Exception as e:  # OOM of the reference at the largest shapes, an SDPA backend not there
                row["error"] = repr(e)[:300]
                rows.append(row)
                print(row, flush=True)
                torch.cuda.empty_cache()
                continue
            fl = useful_flops(B, T, kind)
            floor_f = max(fl / ceil["bf16_matmul_TFLOPs"] / 1e9, ideal_bytes(B, T, False) / ceil["copy_TBps"] / 1e9)
            floor_fb = max(
                3.5 * fl / ceil["bf16_matmul_TFLOPs"] / 1e9, ideal_bytes(B, T, True) / ceil["copy_TBps"] / 1e9
            )
            row.update(
                fwd_tokens_per_s=B * T / t_f * 1e3,
                fwdbwd_tokens_per_s=B * T / t_fb * 1e3,
                fwd_TFLOPs=fl / t_f / 1e9,
                fwdbwd_TFLOPs=3.5 * fl / t_fb / 1e9,
                fwd_roofline_frac=floor_f / t_f,
                fwdbwd_roofline_frac=floor_fb / t_fb,
            )
            if T == 1024 and name != "reference":  # the same timings with the process on one CPU, right after
                with one_cpu():
                    row["one_cpu"] = time_variant(fn, s, g, calls=10)
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            (out_dir / "csa_rows.json").write_text(json.dumps(rows, indent=1))  # partial results, if cut off
        del sets, flex_sets
        torch.cuda.empty_cache()

    graph = [r for B in (16, 64) for r in graph_rows(B, flex_fns[1024], sdpa)]
    (out_dir / "csa_rows.json").write_text(json.dumps(rows + graph, indent=1))
    layer = {}
    for B in (16, 64):
        try:
            layer[f"B{B}_T1024"] = layer_bench(B, 1024)
        except Exception as e:
            layer[f"B{B}_T1024"] = {"error": repr(e)[:300]}
        print("layer", B, layer[f"B{B}_T1024"], flush=True)
    try:  # the whole layer under torch.compile (as in training): inductor fuses the compressor and norms
        layer["B64_T1024_compiled"] = layer_bench(64, 1024, compiled=True)
    except Exception as e:
        layer["B64_T1024_compiled"] = {"error": repr(e)[:300]}
    print("layer compiled", layer["B64_T1024_compiled"], flush=True)

    def ms(variant, B, T=1024, key="fwdbwd_ms", one_cpu=False):
        r = [r.get("one_cpu", {}) if one_cpu else r for r in rows if r["variant"] == variant and r["B"] == B
             and r["T"] == T]
        return r[0][key] if r and key in r[0] else float("nan")

    sdpa_best = lambda B, T=1024, one_cpu=False: min(
        ms(f"sdpa_full_{n}", B, T, one_cpu=one_cpu) for n in sdpa
        if not math.isnan(ms(f"sdpa_full_{n}", B, T, one_cpu=one_cpu))
    )
    summary = {
        "speedup_fwdbwd_vs_flex_B16": ms("flex", 16) / ms("ours", 16),
        "speedup_fwdbwd_vs_flex_B64": ms("flex", 64) / ms("ours", 64),
        "speedup_fwdbwd_vs_sdpa_full_B16": sdpa_best(16) / ms("ours", 16),
        "speedup_fwdbwd_vs_sdpa_full_B64": sdpa_best(64) / ms("ours", 64),
        "speedup_fwdbwd_node_vs_python_B16": ms("ours_python", 16) / ms("ours", 16),
        "speedup_fwdbwd_node_vs_python_B64": ms("ours_python", 64) / ms("ours", 64),
        "speedup_fwd_vs_flex_B16": ms("flex", 16, key="fwd_ms") / ms("ours", 16, key="fwd_ms"),
        "speedup_fwdbwd_vs_reference_B16": ms("reference", 16) / ms("ours", 16),
        "speedup_fwdbwd_vs_flex_B16_T4096": ms("flex", 16, 4096) / ms("ours", 16, 4096),
        "speedup_fwdbwd_vs_sdpa_full_B16_T4096": sdpa_best(16, 4096) / ms("ours", 16, 4096),
        "one_cpu_speedup_fwdbwd_vs_flex_B16": ms("flex", 16, one_cpu=True) / ms("ours", 16, one_cpu=True),
        "one_cpu_speedup_fwdbwd_vs_flex_B64": ms("flex", 64, one_cpu=True) / ms("ours", 64, one_cpu=True),
        "one_cpu_speedup_fwdbwd_vs_sdpa_full_B16": sdpa_best(16, one_cpu=True) / ms("ours", 16, one_cpu=True),
        "one_cpu_speedup_fwdbwd_vs_sdpa_full_B64": sdpa_best(64, one_cpu=True) / ms("ours", 64, one_cpu=True),
        "max_relerr_fwd": max(a["ours"]["fwd"] for a in accuracy.values()),
        "max_relerr_bwd": max(a["ours"]["bwd"] for a in accuracy.values()),
    }
    for key, lay in layer.items():
        if "ours_fwdbwd_ms" in lay:
            summary[f"layer_speedup_fwdbwd_vs_reference_{key}"] = lay["reference_fwdbwd_ms"] / lay["ours_fwdbwd_ms"]
        if "compressor_fused_fwdbwd_ms" in lay:
            summary[f"compressor_fused_speedup_fwdbwd_vs_pytorch_eager_{key}"] = (
                lay["compressor_pytorch_eager_fwdbwd_ms"] / lay["compressor_fused_fwdbwd_ms"]
            )
            summary[f"layer_speedup_fwdbwd_fused_vs_pytorch_compressor_{key}"] = (
                lay["ours_pytorch_compressor_fwdbwd_ms"] / lay["ours_fwdbwd_ms"]
            )
    gms = lambda variant, B, key="fwdbwd_graph_ms": next(
        (r[key] for r in graph if r["variant"] == variant and r["B"] == B and key in r), float("nan")
    )
    for B in (16, 64):  # against the faster of SDPA's default dispatch and cuDNN, as the eager keys
        summary[f"graph_speedup_fwdbwd_vs_flex_B{B}"] = gms("flex", B) / gms("ours", B)
        sdpa_graph = min(gms("sdpa_full_default", B), gms("sdpa_full_cudnn", B))
        summary[f"graph_speedup_fwdbwd_vs_sdpa_full_B{B}"] = sdpa_graph / gms("ours", B)
    result = {
        **meta,
        "rows": rows,
        "graph_rows": graph,
        "accuracy": accuracy,
        "layer": layer,
        "summary": summary,
        "wall_s": time.time() - t0,
    }
    (out_dir / "csa.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "csa.md").write_text(markdown(result))
    print(json.dumps(summary, indent=1))


def markdown(r: dict) -> str:
    lines = [
        "# CSA attention benchmark",
        "",
        f"Device: {r['device']}; torch {r['versions']['torch']}, triton {r['versions']['triton']}, "
        f"CUDA {r['versions']['cuda']}. Command: `{r['command']}`.",
        f"Measured ceilings: copy {r['ceilings']['copy_TBps']:.2f} TB/s, "
        f"bf16 matmul {r['ceilings']['bf16_matmul_TFLOPs']:.0f} TFLOP/s.",
        f"H={H}, Hkv={HKV}, D={D}, window {WINDOW}, stride {STRIDE}, bf16. Kernel config: {r['config']}.",
        "",
        "ms are per call with 10 calls back to back (the host runs ahead as in a training step, so a variant shows",
        "its GPU time unless its host cost is larger, as ours is at B16); the latency columns",
        "time single calls, CPU launch cost included. TFLOP/s count useful (unmasked) FLOPs only.",
        "",
        "| variant | B | T | fwd ms | fwd+bwd ms | fwd lat. ms | fwd+bwd lat. ms | fwd+bwd tok/s | fwd TFLOP/s "
        "| fwd roofline | fwd+bwd roofline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['variant']} | {row['B']} | {row['T']} | error: {row['error'][:80]} | | | | | | | |")
            continue
        lines.append(
            f"| {row['variant']} | {row['B']} | {row['T']} | {row['fwd_ms']:.3f} | {row['fwdbwd_ms']:.3f} | "
            f"{row['fwd_latency_ms']:.3f} | {row['fwdbwd_latency_ms']:.3f} | "
            f"{row['fwdbwd_tokens_per_s']:.3g} | {row['fwd_TFLOPs']:.0f} | {row['fwd_roofline_frac']:.2f} | "
            f"{row['fwdbwd_roofline_frac']:.2f} |"
        )
    lines += [
        "",
        "The same variants at T 1024, timed right after each row above with every thread of the process on one",
        "CPU (`one_cpu()`: on these virtual CPUs an eager step's host cost falls by 30-50% when its threads stay",
        "on one core; the GPU work is the same):",
        "",
        "| variant | B | fwd ms | fwd+bwd ms | fwd lat. ms | fwd+bwd lat. ms |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        if "one_cpu" in row:
            o = row["one_cpu"]
            lines.append(
                f"| {row['variant']} | {row['B']} | {o['fwd_ms']:.3f} | {o['fwdbwd_ms']:.3f} | "
                f"{o['fwd_latency_ms']:.3f} | {o['fwdbwd_latency_ms']:.3f} |"
            )
    lines += ["", "Accuracy vs float64 reference (relative error; bwd = worst of the six gradients):", ""]
    for k, v in r["accuracy"].items():
        lines.append(f"- {k}: " + ", ".join(f"{n} fwd {e['fwd']:.2e} bwd {e['bwd']:.2e}" for n, e in v.items()))
    lines += ["", "Whole CSA layer (model.model.CSA, bf16 weights, projections included), ms:", ""]
    for k, v in r["layer"].items():
        lines.append(
            f"- {k}: " + ", ".join(f"{n} {x:.3f}" if isinstance(x, float) else f"{n} {x}" for n, x in v.items())
        )
    lines += [
        "",
        "GPU time only: each variant's fwd (no grad) and fwd+bwd (torch.autograd.grad over all inputs) captured",
        "in a CUDA graph and replayed (10 replays per sample, median of 30), no host launch cost:",
        "",
        "| variant | B | T | fwd ms | fwd+bwd ms |",
        "|---|---|---|---|---|",
    ]
    for row in r["graph_rows"]:
        if "fwdbwd_graph_ms" in row:
            cells = [row["variant"], row["B"], row["T"], f"{row['fwd_graph_ms']:.3f}", f"{row['fwdbwd_graph_ms']:.3f}"]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += [
        "",
        "Host microseconds per call, issued back to back with one sync at the end (`_one_cpu`: all threads on",
        "one CPU; the step rows alternate free and one-CPU rounds, medians of 3):",
        "",
    ]
    for row in r["graph_rows"]:
        if row["variant"] == "host_us":
            items = ", ".join(f"{k} {v:.0f}" for k, v in row.items() if isinstance(v, float))
            lines.append(f"- B{row['B']}: {items}")
    lines += ["", "Summary:", "", "```", json.dumps(r["summary"], indent=1), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
