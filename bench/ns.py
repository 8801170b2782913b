"""Newton-Schulz for Muon on the 95m model's exact set of Muon matrices (GPU, one run).

Times, side by side in one process (CUDA events, medians, L2 flushed between runs by do_bench):
- ours, Triton: all shape groups in one grouped call (prep + 15 graph-replayed stage launches + finish
  for the bf16 set, the same again for the fp32 set of sides <= 8); the same with eager launches,
  without the symmetric-tile trick, through `newton_schulz_many`, and one call per shape group;
- ours, CUDA C++ (CuPy/NVRTC), one call per shape group, with and without the symmetric trick;
- the same iteration in bf16, batched by shape and torch.compile'd (modded-nanogpt style);
- the fp32 per-matrix loop (reference.newton_schulz per matrix);
- per wide shape: Triton vs CUDA on that stack alone (the table behind "auto");
- the whole optimizer step of the 95m model (train.optim: Muon, all shape groups in one
  `newton_schulz_many` call, + fused AdamW);
plus the bf16 matmul rate and copy bandwidth of the same GPU, for the roofline fractions.

Usage: python bench/ns.py --out DIR   (writes DIR/ns.json and DIR/ns.md)
"""

from __future__ import annotations

import argparse
import json
import platform
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


def median_ms(fn, warmup=25, rep=200) -> float:
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float("inf") if not torch.isfinite(out).all() else ((out - ref).norm() / ref.norm()).item()


def sv(X: torch.Tensor) -> tuple[float, float]:
    s = torch.linalg.svdvals(X.double())
    return s.min().item(), s.max().item()


def kernel_times(fn) -> list[tuple[str, float]]:
    """Device time of each kernel of one call, in launch order (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    evs.sort(key=lambda e: e.time_range.start)
    return [(e.name[:40], round(e.time_range.elapsed_us(), 1)) for e in evs]


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


def optimizer_step(records: dict) -> dict:
    """Whole optimizer step (Muon + AdamW) of the 95m model with random gradients."""
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
    out["adamw_only_ms"] = median_ms(opts[1].step, warmup=5, rep=300)
    records["optimizer"] = out
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("profiles"))
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
        "command": "python bench/ns.py --out DIR",
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
    }
    print(f"{len(shapes)} matrices, {len(exact)} exact-shape groups, {len(wide)} groups after transposing tall ones")
    for (m, n), c in sorted(exact.items(), key=lambda x: -x[1]):
        print(f"  exact {m:5d} x {n:5d}: {c}")
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
        print(f"{name:44s} {ms:8.3f} ms  {total_flops / ms / 1e9:6.1f} TFLOP/s  relerr {err:.2e}", flush=True)

    sched = [NS_COEFFS] * STEPS
    configs = {
        "s128w8_x128x128w8": triton_ns.Config(),
        # run of 2026-11-24 02:41 (H100) also timed s64w4_x128x128w8 (bs=64, warps=4, stages=4): 6.10 ms and
        # s128w8_x128x256w8 (bn=256): 5.86 ms, against 5.91 ms for the default: within noise, not kept
    }
    for cname, cfg in configs.items():
        run(f"triton grouped [{cname}]", lambda cfg=cfg: triton_ns.newton_schulz_triton(stacks, sched, config=cfg))
    best = min(configs, key=lambda c: variants[f"triton grouped [{c}]"]["ms"])
    cfg = configs[best]
    rec["best_triton_config"] = {"name": best, **cfg.__dict__}
    run(
        "triton grouped, eager launches (no graph)",
        lambda: triton_ns.newton_schulz_triton(stacks, sched, config=cfg, graphs=False),
    )
    run("triton grouped, no symmetry", lambda: triton_ns.newton_schulz_triton(stacks, sched, sym=False, config=cfg))
    rec["kernel_sequence_us"] = {
        "triton grouped, eager": kernel_times(
            lambda: triton_ns.newton_schulz_triton(stacks, sched, config=cfg, graphs=False)
        )
    }
    print("kernel sequence (us):", rec["kernel_sequence_us"], flush=True)
    pe = list(polar_express(STEPS))
    pe_out = newton_schulz_many(stacks, STEPS, pe, check_finite=False)
    rec["polar_express"] = {
        "coeffs": pe,
        "sv_range_first_matrix_per_group": [sv(X[0]) for X in pe_out],
        "sv_range_default_coeffs": [sv(X[0]) for X in newton_schulz_many(stacks, check_finite=False)],
        "ms": median_ms(lambda: newton_schulz_many(stacks, STEPS, pe, check_finite=False)),
    }
    print("polar express:", rec["polar_express"], flush=True)
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
        big = stacks[0]
        rec["kernel_sequence_us"][f"cuda {tuple(big.shape)}"] = kernel_times(
            lambda: cuda.newton_schulz_cuda(big, sched)
        )
    save(rec, args.out)

    torch._dynamo.config.cache_size_limit = 64
    compiled = torch.compile(zeropower_bf16, dynamic=False)
    t0 = time.time()
    [compiled(S) for S in stacks]
    print(f"torch.compile warm-up {time.time() - t0:.1f} s", flush=True)
    run("compiled bf16 batched by shape (torch.compile)", lambda: [compiled(S) for S in stacks])
    run("fp32 per-matrix loop", lambda: [torch.stack([ns_reference(S[i]) for i in range(S.shape[0])]) for S in stacks])

    # per wide shape: one stack alone, Triton vs CUDA (the AUTO_TABLE measurement)
    per_shape = {}
    for (m, n), c in wide.items():
        S = torch.randn(c, m, n, device="cuda")
        row = {"count": c, "gflop": c * flops(m, n) / 1e9}
        row["triton_ms"] = median_ms(lambda S=S: triton_ns.newton_schulz_triton([S], sched, config=cfg))
        row["triton_relerr"] = relerr(
            triton_ns.newton_schulz_triton([S], sched, config=cfg)[0], ns_reference(S.double())
        )
        if cuda.available(S.device):
            row["cuda_ms"] = median_ms(lambda S=S: newton_schulz(S, backend="cuda", check_finite=False))
            row["cuda_relerr"] = relerr(newton_schulz(S, backend="cuda", check_finite=False), ns_reference(S.double()))
        row["faster"] = "cuda" if row.get("cuda_ms", float("inf")) < row["triton_ms"] else "triton"
        per_shape[f"{m}x{n}"] = row
        print(f"  {m:5d} x {n:5d} x{c:3d}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("ms")))
    rec["per_wide_shape"] = per_shape
    save(rec, args.out)

    opt = optimizer_step(rec)
    print("optimizer step:", opt, flush=True)

    rec["summary"] = summarize(rec)
    rec["bench_seconds"] = time.time() - t_start
    save(rec, args.out)
    (args.out / "ns.md").write_text(markdown(rec))
    print(json.dumps(rec["summary"], indent=1))


def summarize(rec: dict) -> dict:
    """The headline numbers: our fastest NS variant against the baselines, and the fastest measured whole
    optimizer step (train/optim.py: Muon + fused AdamW)."""
    variants, opt = rec["variants"], rec.get("optimizer", {})
    ours_ms, ours = min((v["ms"], k) for k, v in variants.items() if k.startswith(("triton", "cuda")))
    comp = variants["compiled bf16 batched by shape (torch.compile)"]["ms"]
    loop = variants["fp32 per-matrix loop"]["ms"]
    flops = rec["grouping"]["gflop_per_ns_call"] * 1e9
    return {
        "device": rec["device"],
        "ours": ours,
        "ours_ms": ours_ms,
        "compiled_bf16_ms": comp,
        "fp32_loop_ms": loop,
        "speedup_vs_compiled_bf16": comp / ours_ms,
        "speedup_vs_fp32_loop": loop / ours_ms,
        "optimizer_step_ms": opt.get("train_optim_ms"),
        "tflops": flops / ours_ms / 1e9,
        "bf16_matmul_tflops": rec["ceilings"]["bf16_matmul_tflops"],
        "fraction_of_matmul_rate": flops / ours_ms / 1e9 / rec["ceilings"]["bf16_matmul_tflops"],
    }


def markdown(rec: dict) -> str:
    s = rec["summary"]
    lines = [
        "# Newton-Schulz for Muon: benchmark",
        "",
        f"Device {rec['device']}, torch {rec['torch']}, triton {rec['triton']}, cupy {rec['cupy']}. "
        f"Command: `{rec['command']}`. bf16 matmul {rec['ceilings']['bf16_matmul_tflops']:.0f} TFLOP/s, "
        f"copy {rec['ceilings']['copy_gbps']:.0f} GB/s (same run).",
        "",
        f"Work: {rec['grouping']['matrices']} matrices, {len(rec['grouping']['exact_shape_groups'])} exact-shape "
        f"groups, {len(rec['grouping']['wide_shape_groups'])} after transposing tall ones; "
        f"{rec['grouping']['gflop_per_ns_call']:.0f} GFLOP per orthogonalization (5 steps, dense count).",
        "",
        "| variant | median ms | TFLOP/s | max relerr vs fp64 |",
        "|---|---|---|---|",
    ]
    for k, v in rec["variants"].items():
        lines.append(f"| {k} | {v['ms']:.3f} | {v['tflops']:.1f} | {v['relerr_max']:.2e} |")
    lines += ["", "Per wide shape, one stack alone (ms):", ""]
    lines += ["| shape | count | triton | cuda | faster |", "|---|---|---|---|---|"]
    for k, v in rec["per_wide_shape"].items():
        lines.append(
            f"| {k} | {v['count']} | {v['triton_ms']:.3f} | {v.get('cuda_ms', float('nan')):.3f} | {v['faster']} |"
        )
    lines += ["", f"Optimizer step: {json.dumps(rec.get('optimizer'))}", "", "Summary: " + json.dumps(s), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
