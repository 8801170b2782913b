"""Newton-Schulz for Muon on the 95m model's exact set of Muon matrices (GPU, one run).

Times, side by side in one process (CUDA events, medians, L2 flushed between runs by do_bench):
- ours, Triton: all shape groups in one grouped call (one graph-replayed call; each set of matrices on its
  own stream: the wide ones in the Gram form, 18 launches, their [m, m] products in the Gluon kernel on an
  H100; the others in the plain iteration, 16; the fp32 set of sides <= 8, 16); the same with the plain
  iteration only, with Triton stages only, with fp16 operands, with eager launches, without the
  symmetric-tile trick or the half tiles, through `newton_schulz_many`, and one call per shape group; the
  device time of each launch (torch.profiler), summed per stage;
- ours, CUDA C++ (CuPy/NVRTC), one call per shape group, with and without the symmetric trick;
- the same iteration in bf16, batched by exact shape, torch.compile'd: a compiled function called per
  shape group (the modded-nanogpt way), all groups in one compiled function, and that function in
  mode="reduce-overhead" (CUDA graphs); each timed in several rounds interleaved with ours (spread
  reported), with its host time per call and its summed kernel time;
- the fp32 per-matrix loop (reference.newton_schulz per matrix);
- per wide shape: Triton vs CUDA on that stack alone (the table behind "auto"), and Triton's plain
  iteration beside its Gram form where that applies;
- the whole optimizer step of the 95m model (train.optim: Muon through the fused `muon_update_`, +
  fused AdamW), and the same with Muon's unfused path (foreach ops + newton_schulz_many);
plus the bf16 matmul rate and copy bandwidth of the same GPU, for the roofline fractions.
`--sweep` adds a tile-config sweep at the end (stage 3, the symmetric stages, the fp32 tiny set; per-stage
times).

Usage: python bench/ns.py --out DIR [--sweep]   (writes DIR/ns.json and DIR/ns.md)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.ns import (  # noqa: E402
    NS_COEFFS,
    cuda,
    newton_schulz,
    newton_schulz_many,
    polar_express,
    triton_ns,
)
from kernels.ns.reference import newton_schulz as ns_reference  # noqa: E402

STEPS = 5

# the 95m model's Muon matrices [out, in] (shared/spec/hybrid-95m.md), conv1d.weight [3024, 1, 4] as [3024, 4]
GDN = {"in_proj_qkv": (3024, 576), "in_proj_z": (1008, 576), "in_proj_b": (9, 576), "in_proj_a": (9, 576),
       "out_proj": (576, 1008), "conv1d": (3024, 4)}  # fmt: skip
ATTN = {"wq": (1152, 576), "wk": (192, 576), "wv": (192, 576), "wo": (576, 576)}
CSA = {**ATTN, "compress_k": (192, 192), "compress_v": (192, 192), "blend_gate": (576, 576)}
FFN = {"w1": (1536, 576), "w3": (1536, 576), "w2": (576, 1536)}
LAYERS = {"gdn": 8, "csa": 4, "full": 4}


def muon_shapes() -> list[tuple[int, int]]:
    shapes = []
    for kind, count in LAYERS.items():
        mixer = {"gdn": GDN, "csa": CSA, "full": ATTN}[kind]
        shapes += [s for _ in range(count) for s in (*mixer.values(), *FFN.values())]
    return shapes


def flops(m: int, n: int, steps: int = STEPS) -> float:
    """Dense FLOPs of the quintic iteration on one matrix (wide m <= n): X X^T, A A, B X per step."""
    m, n = min(m, n), max(m, n)
    return steps * (4.0 * m * m * n + 2.0 * m**3)


def flops_as_run(m: int, n: int, cfg: triton_ns.Config, work_dtype=torch.bfloat16, steps: int = STEPS) -> float:
    """Dense FLOPs of the form our kernels run for this shape: the plain iteration, or the Gram form
    (per segment of L steps: X X^T and Q X, and 4 L - 3 products of [m, m] matrices; default coefficients)."""
    m, n = min(m, n), max(m, n)
    if not triton_ns.gram_form((m, n), cfg):
        return flops(m, n, steps)
    segs = triton_ns._segments((NS_COEFFS,) * steps, work_dtype, cfg.gram_drift)
    return sum(4.0 * m * m * n + (4 * L - 3) * 2.0 * m**3 for L in segs)


def zeropower_bf16(G: torch.Tensor) -> torch.Tensor:
    """The iteration in bf16 on a same-shape stack, as modded-nanogpt writes it (our own code)."""
    a, b, c = NS_COEFFS
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(STEPS):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X


def zeropower_bf16_all(stacks: list[torch.Tensor]) -> list[torch.Tensor]:
    """All shape groups in one function (one compiled graph, one guard check per call)."""
    return [zeropower_bf16(S) for S in stacks]


def median_ms(fn, warmup=25, rep=200) -> float:
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float("inf") if not torch.isfinite(out).all() else ((out - ref).norm() / ref.norm()).item()


def sv(X: torch.Tensor) -> tuple[float, float]:
    s = torch.linalg.svdvals(X.double())
    return s.min().item(), s.max().item()


def kernel_times(fn, calls: int = 3) -> list[tuple[str, float, int]]:
    """(name, device us, stream) of each kernel of one call, by stream, in launch order within a stream
    (torch.profiler; per-position median over `calls` calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(calls):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        evs.sort(key=lambda e: (getattr(e, "device_resource_id", 0), e.time_range.start))
        runs.append([(e.name[:40], e.time_range.elapsed_us(), getattr(e, "device_resource_id", 0)) for e in evs])
    n = min(len(r) for r in runs)
    return [(runs[0][i][0], round(statistics.median(r[i][1] for r in runs), 1), runs[0][i][2]) for i in range(n)]


STAGE_NAMES = {
    int(triton_ns.PREP): "prep",
    int(triton_ns.XXT): "R=XX^T",
    int(triton_ns.POLY): "B=aI+bR+cR^2",
    int(triton_ns.APPLY): "X'=UX",
    int(triton_ns.PRODUCT): "UV (Gram form)",
}


def stage_sums(seq: list[tuple[str, float, int]], cfg: triton_ns.Config, work_dtype=torch.bfloat16) -> dict:
    """Our launches summed per stage (STAGE_NAMES; the last X'=UX, which writes the output, also alone), per
    set (one per stream: the Gram-form set, the plain set, the fp32 tiny set), the larger set first; and the
    total of all kernels (the sets' streams overlap, so this exceeds the call's time). A set's launches are
    told from its count: plain 1 + 3 * STEPS, Gram form that of `triton_ns._recipe`."""
    sched = (NS_COEFFS,) * STEPS
    gram = triton_ns._segments(sched, work_dtype, cfg.gram_drift)
    recipes = {len(r): r for r in (triton_ns._recipe(sched, (1,) * STEPS), triton_ns._recipe(sched, gram))}
    by_stream: dict[int, list[float]] = {}
    for name, us, stream in seq:
        if name.startswith(("_ns_stage", "_sym_products")):
            by_stream.setdefault(stream, []).append(us)
    out = {"kernels_total_us": round(sum(us for _, us, _ in seq), 1)}
    for k, x in enumerate(sorted(by_stream.values(), key=sum, reverse=True)):
        recipe = recipes.get(len(x))
        if recipe is None:  # not one call's launches of one set
            out[f"set{k}"] = {"launches": len(x), "total": round(sum(x), 1)}
            continue
        row = {"form": "plain" if len(recipe) == 1 + 3 * STEPS else "Gram"}
        for stage, name in STAGE_NAMES.items():
            row[name] = round(sum(us for us, L in zip(x, recipe, strict=True) if L.stage == stage), 1)
        out[f"set{k}"] = {**row, "last X'=UX (with finish)": x[-1], "total": round(sum(x), 1)}
    return out


def host_ms(fn, calls: int = 20) -> float:
    """Median host time to issue one call (synchronized before, not after): the CPU cost of its launches."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def save(rec: dict, out: Path) -> None:
    (out / "ns.json").write_text(json.dumps(rec, indent=1))


def ceilings() -> dict:
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = median_ms(lambda: x @ y, rep=300)
    big = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(big)
    tc = median_ms(lambda: dst.copy_(big), rep=300)
    return {"bf16_matmul_tflops": 2 * 8192**3 / t / 1e9, "copy_gbps": 2 * big.numel() * 4 / tc / 1e6}


def host_info() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {"cpu": model, "cpus": os.cpu_count(), "loadavg": os.getloadavg()}


def optimizer_step(records: dict) -> dict:
    """Whole optimizer step (Muon + AdamW) of the 95m model with random gradients: Muon fused (what
    train.optim runs on CUDA) and unfused (the same code with the fused path declined)."""
    try:
        from model import Hyla, get_config
        from train.optim import build_optimizers, split_params
    except ImportError as e:
        return {"skipped": f"train/optim.py or model not importable: {e}"}
    model = Hyla(get_config("95m")).cuda()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opts = build_optimizers(model)
    out = {"muon_params": len(split_params(model)[0]), "adamw_params": sum(len(split_params(model)[i]) for i in (1, 2))}

    def step_train():
        for o in opts:
            o.step()

    out["train_optim_ms"] = median_ms(step_train, warmup=5, rep=300)
    out["muon_only_ms"] = median_ms(opts[0].step, warmup=5, rep=300)
    out["adamw_only_ms"] = median_ms(opts[1].step, warmup=5, rep=300)
    out["train_optim_host_ms"] = host_ms(step_train)
    out["muon_only_host_ms"] = host_ms(opts[0].step)
    addresses = triton_ns.muon_addresses
    triton_ns.muon_addresses = lambda ts: None  # declines the fused path
    try:
        out["unfused_muon_train_optim_ms"] = median_ms(step_train, warmup=5, rep=300)
        out["unfused_muon_only_ms"] = median_ms(opts[0].step, warmup=5, rep=300)
    finally:
        triton_ns.muon_addresses = addresses
    out["train_optim_ms_again"] = median_ms(step_train, warmup=5, rep=300)
    records["optimizer"] = out
    return out


# (set, field overrides) in the order tried: "main" overrides Config for the sides > TINY, "tiny" TINY_CONFIG.
# Run 5 of 2026-11-24 (H100, main set 2.68 ms with the default Config): stage 3 as 128 x 256 2.62, 128 x 128
# with 4 warps 2.67, with 4 stages 2.89, 64 x 128 2.87, 64 x 256 2.99, 128 x 64 3.00; symmetric stages with
# 4 warps 2.66, 4 stages 2.81, 64-wide 2.83 / 3.00 (K step 128), K step 128 3.12 ms. The tiny set with FMA
# ("ieee") products took 0.43-0.70 ms whatever the K step (64..512). Run 6 timed the close calls again:
# 2.58-2.63 ms against 2.61 ms for the default, i.e. within the spread; the default stays.
# Sessions 3-4 (profiles/ns.md, runs 7-9): PDL, device-side TMA, a persistent stage 3, and one
# dependency-scheduled launch for every phase (run 9: 2.873 ms against 2.621 for this code's launch per phase,
# Muon 3.348 against 3.031 ms) all lost; none is kept.
SWEEP = [
    ("tiny", dict(fp32_dot="ieee")),
    ("tiny", dict(bk=256)),
    ("main", dict(bm=128, bn=256, bk3=64, warps3=8, stages3=3)),
    ("main", dict(bm=128, bn=128, bk3=64, warps3=4, stages3=3)),
    ("main", dict(bs=128, bk=64, warps=4, stages=3)),
]


def sweep(stacks, refs, sched, rec: dict, deadline: float, save_fn) -> None:
    """Tile configs, one field group at a time against the defaults: the main set (sides > TINY) with
    Config overrides, the tiny set with TINY_CONFIG overrides; whole-call median and stage sums. Stops
    at `deadline` (time.time())."""
    main = [i for i, S in enumerate(stacks) if min(S.shape[1:]) > triton_ns.TINY]
    sets = {"main": main, "tiny": [i for i in range(len(stacks)) if i not in main]}
    out = rec.setdefault("sweep", {})
    base, tiny_default = triton_ns.Config(), triton_ns.TINY_CONFIG

    def one(name, idx, cfg):
        Ss = [stacks[i] for i in idx]
        try:
            outs = triton_ns.newton_schulz_triton(Ss, sched, config=cfg)
            err = max(relerr(o, refs[i]) for o, i in zip(outs, idx, strict=True))
            ms = median_ms(lambda: triton_ns.newton_schulz_triton(Ss, sched, config=cfg))
            st = stage_sums(
                kernel_times(lambda: triton_ns.newton_schulz_triton(Ss, sched, config=cfg, graphs=False)), cfg
            )
            out[name] = {"ms": ms, "relerr": err, "stages_us": st}
            print(f"sweep {name:72s} {ms:7.3f} ms relerr {err:.2e} {st.get('set0')}", flush=True)
        except Exception as e:  # a config that does not compile (shared memory, registers) is recorded
            out[name] = {"error": repr(e)[:300]}
            print(f"sweep {name}: {e!r}"[:300], flush=True)
        save_fn()

    one("main default " + json.dumps(dataclasses.asdict(base)), sets["main"], base)
    one("tiny default " + json.dumps(dataclasses.asdict(tiny_default)), sets["tiny"], base)
    for which, o in SWEEP:
        if time.time() > deadline:
            out["stopped_at_deadline_before"] = f"{which} {json.dumps(o)}"
            break
        if which == "main":
            one("main " + json.dumps(o), sets["main"], dataclasses.replace(base, **o))
            continue
        triton_ns.TINY_CONFIG = dataclasses.replace(tiny_default, **o)
        try:
            one("tiny " + json.dumps(o), sets["tiny"], base)
        finally:
            triton_ns.TINY_CONFIG = tiny_default


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("profiles"))
    ap.add_argument("--sweep", action="store_true", help="add the tile-config sweep (SWEEP) at the end")
    ap.add_argument("--sweep-seconds", type=float, default=400.0, help="start no sweep config after this")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t_start = time.time()
    dev = torch.cuda.get_device_name()
    rec: dict = {
        "device": dev,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cupy": getattr(cuda.cupy, "__version__", None),
        "python": platform.python_version(),
        "host": host_info(),
        "command": "python bench/ns.py --out DIR" + (" --sweep" if args.sweep else ""),
    }
    rec["ceilings"] = ceilings()
    print(rec, flush=True)

    shapes = muon_shapes()
    exact = Counter(shapes)
    wide = Counter(tuple(sorted(s)) for s in shapes)
    total_flops = sum(flops(*s) for s in shapes)
    rec["grouping"] = {
        "matrices": len(shapes),
        "exact_shape_groups": {f"{m}x{n}": c for (m, n), c in exact.items()},
        "wide_shape_groups": {f"{m}x{n}": c for (m, n), c in wide.items()},
        "gflop_per_ns_call": total_flops / 1e9,
        "gflop_per_ns_call_as_run": sum(flops_as_run(*s, triton_ns.Config()) for s in shapes) / 1e9,
    }
    print(f"{len(shapes)} matrices, {len(exact)} exact-shape groups, {len(wide)} groups after transposing tall ones")
    for (m, n), c in sorted(wide.items(), key=lambda x: -x[1]):
        print(f"  wide  {m:5d} x {n:5d}: {c}   {c * flops(m, n) / 1e9:8.1f} GFLOP")
    print(f"total {total_flops / 1e12:.3f} TFLOP per orthogonalization of all Muon matrices", flush=True)

    # one stack per exact shape (what a per-shape Muon holds), fp32 like the model's gradients
    stacks = [torch.randn(c, m, n, device="cuda") for (m, n), c in exact.items()]
    refs = [ns_reference(S.double()) for S in stacks]  # float64 reference on the GPU

    def check(outs) -> float:
        return max(relerr(o, r) for o, r in zip(outs, refs, strict=True))

    variants: dict[str, dict] = {}
    rec["variants"] = variants

    def run(name, fn, **extra):
        outs = fn()
        err = check(outs)
        ms = median_ms(fn)
        variants[name] = {"ms": ms, "relerr_max": err, "tflops": total_flops / ms / 1e9, **extra}
        print(f"{name:48s} {ms:8.3f} ms  {total_flops / ms / 1e9:6.1f} TFLOP/s  relerr {err:.2e}", flush=True)

    sched = [NS_COEFFS] * STEPS
    cfg = triton_ns.Config()
    rec["triton_config"] = {**dataclasses.asdict(cfg), "tiny": dataclasses.asdict(triton_ns.TINY_CONFIG)}
    ours = "triton grouped (graph-replayed)"

    def ours_fn():
        return triton_ns.newton_schulz_triton(stacks, sched, config=cfg)

    run(ours, ours_fn)
    run(
        "triton grouped, eager launches (no graph)",
        lambda: triton_ns.newton_schulz_triton(stacks, sched, config=cfg, graphs=False),
    )
    run("triton grouped, no symmetry", lambda: triton_ns.newton_schulz_triton(stacks, sched, sym=False, config=cfg))
    plain = dataclasses.replace(cfg, gram_aspect=float("inf"))
    run("triton grouped, plain iteration only (no Gram form)",
        lambda: triton_ns.newton_schulz_triton(stacks, sched, config=plain))  # fmt: skip
    no_gluon = dataclasses.replace(cfg, gluon=False)
    run("triton grouped, Triton stages only (no Gluon kernel)",
        lambda: triton_ns.newton_schulz_triton(stacks, sched, config=no_gluon))  # fmt: skip
    run("triton grouped, fp16 operands (X_0 in bf16; Gram segments 3 + 2)",
        lambda: triton_ns.newton_schulz_triton(stacks, sched, work_dtype=torch.float16, config=cfg))  # fmt: skip
    seq_plain = kernel_times(lambda: triton_ns.newton_schulz_triton(stacks, sched, config=plain, graphs=False))
    rec["stage_sums_us_plain_only"] = stage_sums(seq_plain, plain)
    print("stage sums, plain only (us):", rec["stage_sums_us_plain_only"], flush=True)
    padded = dataclasses.replace(cfg, half_tiles=False)
    run("triton grouped, no half tiles", lambda: triton_ns.newton_schulz_triton(stacks, sched, config=padded))
    main_idx = [i for i, S in enumerate(stacks) if min(S.shape[1:]) > triton_ns.TINY]
    main_set = [stacks[i] for i in main_idx]
    main_ms = median_ms(lambda: triton_ns.newton_schulz_triton(main_set, sched, config=cfg))
    rec["main_set_alone_ms"] = main_ms  # what the side-stream overlap of the tiny set can reach at best
    print(f"main set alone (sides > {triton_ns.TINY}) {main_ms:.3f} ms", flush=True)
    seq = kernel_times(lambda: triton_ns.newton_schulz_triton(stacks, sched, config=cfg, graphs=False))
    rec["kernel_sequence_us"] = {"triton grouped, eager": seq}
    rec["stage_sums_us"] = stage_sums(seq, cfg)
    print("stage sums (us):", rec["stage_sums_us"], flush=True)
    pe = list(polar_express(STEPS))
    pe_out = newton_schulz_many(stacks, STEPS, pe, check_finite=False)
    rec["polar_express"] = {
        "coeffs": pe,
        "sv_range_first_matrix_per_group": [sv(X[0]) for X in pe_out],
        "sv_range_default_coeffs": [sv(X[0]) for X in newton_schulz_many(stacks, check_finite=False)],
        "ms": median_ms(lambda: newton_schulz_many(stacks, STEPS, pe, check_finite=False)),
    }
    run("triton grouped via newton_schulz_many", lambda: newton_schulz_many(stacks, check_finite=False))
    run(
        "triton one call per shape group",
        lambda: [newton_schulz(S, backend="triton", check_finite=False) for S in stacks],
    )
    if cuda.available(stacks[0].device):
        run(
            "cuda one call per shape group",
            lambda: [newton_schulz(S, backend="cuda", check_finite=False) for S in stacks],
        )
        run(
            "cuda per group, no symmetry",
            lambda: [
                cuda.newton_schulz_cuda(S, sched, sym=False)
                if min(S.shape[1:]) > cuda.TINY
                else newton_schulz(S, backend="cuda", check_finite=False)
                for S in stacks
            ],
        )
    save(rec, args.out)

    # the compiled bf16 baselines
    torch._dynamo.config.cache_size_limit = 64
    per_group = torch.compile(zeropower_bf16, dynamic=False)
    one_fn = torch.compile(zeropower_bf16_all, dynamic=False)
    graphed = torch.compile(zeropower_bf16_all, dynamic=False, mode="reduce-overhead")

    def graphed_call():
        torch.compiler.cudagraph_mark_step_begin()
        return graphed(stacks)

    baselines = {
        "compiled bf16, per shape group (modded-nanogpt way)": lambda: [per_group(S) for S in stacks],
        "compiled bf16, all groups in one function": lambda: one_fn(stacks),
        "compiled bf16, all groups, reduce-overhead (CUDA graphs)": graphed_call,
    }
    compile_s = {}
    for name, fn in baselines.items():
        t0 = time.time()
        for _ in range(3):  # the graphed mode records on its second/third call
            fn()
        torch.cuda.synchronize()
        compile_s[name] = time.time() - t0
        run(name, fn)
        variants[name]["host_ms"] = host_ms(fn)
        variants[name]["kernels_total_us"] = round(sum(x[1] for x in kernel_times(fn, calls=1)), 1)
        print(f"   compile+warm-up {compile_s[name]:.1f} s, host {variants[name]['host_ms']:.2f} ms/call, "
              f"kernels {variants[name]['kernels_total_us'] / 1e3:.2f} ms", flush=True)  # fmt: skip
    variants[ours]["host_ms"] = host_ms(ours_fn)
    variants[ours]["kernels_total_us"] = rec["stage_sums_us"]["kernels_total_us"]
    # rounds interleaved with ours: the spread within one run
    rounds = {k: [] for k in (ours, *baselines)}
    for _ in range(5):
        rounds[ours].append(median_ms(ours_fn))
        for name, fn in baselines.items():
            rounds[name].append(median_ms(fn))
    rec["rounds_ms"] = rounds
    rec["compile_seconds"] = compile_s
    for k, v in rounds.items():
        print(f"rounds {k:56s} median {statistics.median(v):7.3f}  min {min(v):7.3f}  max {max(v):7.3f}", flush=True)
    run("fp32 per-matrix loop", lambda: [torch.stack([ns_reference(S[i]) for i in range(S.shape[0])]) for S in stacks])
    save(rec, args.out)

    # per wide shape: one stack alone, Triton vs CUDA (the AUTO_TABLE measurement)
    per_shape = {}
    for (m, n), c in wide.items():
        S = torch.randn(c, m, n, device="cuda")
        row = {"count": c, "gflop": c * flops(m, n) / 1e9}
        row["triton_ms"] = median_ms(lambda S=S: triton_ns.newton_schulz_triton([S], sched, config=cfg))
        row["triton_relerr"] = relerr(
            triton_ns.newton_schulz_triton([S], sched, config=cfg)[0], ns_reference(S.double())
        )
        if flops_as_run(m, n, cfg) != flops(m, n):  # the Gram form: the plain iteration beside it
            row["triton_plain_ms"] = median_ms(lambda S=S: triton_ns.newton_schulz_triton([S], sched, config=plain))
            row["triton_plain_relerr"] = relerr(
                triton_ns.newton_schulz_triton([S], sched, config=plain)[0], ns_reference(S.double())
            )
        if cuda.available(S.device):
            row["cuda_ms"] = median_ms(lambda S=S: newton_schulz(S, backend="cuda", check_finite=False))
            row["cuda_relerr"] = relerr(newton_schulz(S, backend="cuda", check_finite=False), ns_reference(S.double()))
        row["faster"] = "cuda" if row.get("cuda_ms", float("inf")) < row["triton_ms"] else "triton"
        per_shape[f"{m}x{n}"] = row
        ms = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("ms"))
        print(f"  {m:5d} x {n:5d} x{c:3d}: {ms}", flush=True)
    rec["per_wide_shape"] = per_shape
    save(rec, args.out)

    opt = optimizer_step(rec)
    print("optimizer step:", opt, flush=True)

    def finish():
        rec["summary"] = summarize(rec)
        rec["bench_seconds"] = time.time() - t_start
        save(rec, args.out)
        (args.out / "ns.md").write_text(markdown(rec))

    finish()
    print(json.dumps(rec["summary"], indent=1), flush=True)
    if args.sweep:
        sweep(stacks, refs, sched, rec, t_start + args.sweep_seconds, finish)


def summarize(rec: dict) -> dict:
    """The headline numbers. Ours and every compiled baseline: the median of the interleaved rounds.
    The compiled baseline is the fastest compiled variant (never a handicapped one); the ratio to the
    modded-nanogpt way (compiled function per shape group) is reported beside it. The optimizer step is
    train/optim.py as it runs on CUDA (Muon fused + fused AdamW)."""
    rounds, variants, opt = rec["rounds_ms"], rec["variants"], rec.get("optimizer", {})
    med = {k: statistics.median(v) for k, v in rounds.items()}
    ours = next(k for k in rounds if k.startswith("triton"))
    comp = min((v, k) for k, v in med.items() if k.startswith("compiled"))
    modded = next(k for k in med if "modded" in k)
    loop = variants["fp32 per-matrix loop"]["ms"]
    flops = rec["grouping"]["gflop_per_ns_call"] * 1e9
    return {
        "device": rec["device"],
        "ours": ours,
        "ours_ms": med[ours],
        "compiled_bf16_ms": comp[0],
        "compiled_bf16_variant": comp[1],
        "fp32_loop_ms": loop,
        "speedup_vs_compiled_bf16": comp[0] / med[ours],
        "speedup_vs_compiled_bf16_modded_nanogpt_way": med[modded] / med[ours],
        "speedup_vs_fp32_loop": loop / med[ours],
        "optimizer_step_ms": opt.get("train_optim_ms"),
        "tflops": flops / med[ours] / 1e9,
        "bf16_matmul_tflops": rec["ceilings"]["bf16_matmul_tflops"],
        "fraction_of_matmul_rate": flops / med[ours] / 1e9 / rec["ceilings"]["bf16_matmul_tflops"],
    }


def markdown(rec: dict) -> str:
    s = rec["summary"]
    lines = [
        "# Newton-Schulz for Muon: benchmark",
        "",
        f"Device {rec['device']}, torch {rec['torch']}, triton {rec['triton']}, cupy {rec['cupy']}, host "
        f"{rec['host']['cpu']} ({rec['host']['cpus']} CPUs). Command: `{rec['command']}`. bf16 matmul "
        f"{rec['ceilings']['bf16_matmul_tflops']:.0f} TFLOP/s, copy {rec['ceilings']['copy_gbps']:.0f} GB/s "
        "(same run).",
        "",
        f"Work: {rec['grouping']['matrices']} matrices, {len(rec['grouping']['exact_shape_groups'])} exact-shape "
        f"groups, {len(rec['grouping']['wide_shape_groups'])} after transposing tall ones; "
        f"{rec['grouping']['gflop_per_ns_call']:.0f} GFLOP per orthogonalization (5 steps, dense count of the "
        f"plain iteration: every TFLOP/s below is on it); the form our kernels run (Gram form on the wide "
        f"matrices) has {rec['grouping']['gflop_per_ns_call_as_run']:.0f}.",
        "",
        "| variant | median ms | TFLOP/s | max relerr vs fp64 | host ms/call | kernel ms/call |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in rec["variants"].items():
        extra = f"{v['host_ms']:.2f} | {v['kernels_total_us'] / 1e3:.2f}" if "host_ms" in v else " | "
        lines.append(f"| {k} | {v['ms']:.3f} | {v['tflops']:.1f} | {v['relerr_max']:.2e} | {extra} |")
    lines += ["", "Rounds interleaved in the run (each a do_bench median, ms):", ""]
    lines += ["| variant | rounds | median | min | max |", "|---|---|---|---|---|"]
    for k, v in rec["rounds_ms"].items():
        r = ", ".join(f"{x:.3f}" for x in v)
        lines.append(f"| {k} | {r} | {statistics.median(v):.3f} | {min(v):.3f} | {max(v):.3f} |")
    lines += ["", f"Stage sums of our eager launches (us): `{json.dumps(rec['stage_sums_us'])}`"]
    if "per_wide_shape" in rec:
        lines += ["", "Per wide shape, one stack alone (ms):", ""]
        lines += ["| shape | count | triton | triton, plain iteration | cuda | faster |", "|---|---|---|---|---|---|"]
        for k, v in rec["per_wide_shape"].items():
            lines.append(
                f"| {k} | {v['count']} | {v['triton_ms']:.3f} | {v.get('triton_plain_ms', float('nan')):.3f} | "
                f"{v.get('cuda_ms', float('nan')):.3f} | {v['faster']} |"
            )
    if "sweep" in rec:
        lines += ["", "Tile-config sweep (ms, whole call on the named set):", ""]
        for k, v in rec["sweep"].items():
            if isinstance(v, dict):
                st = v.get("stages_us", {}).get("set0")
                lines.append(f"- {k}: " + (f"{v['ms']:.3f} ms, stage sums (us) {st}" if "ms" in v else v["error"]))
            else:
                lines.append(f"- {k}: {v}")
    lines += ["", f"Optimizer step: {json.dumps(rec.get('optimizer'))}", "", "Summary: " + json.dumps(s), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
