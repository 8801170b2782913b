"""Training-step throughput and MFU of the 95m model on one GPU: our kernels vs the pure-PyTorch fallback.

One run, same GPU: a full step (bf16 autocast forward + backward, grad clip, Muon + AdamW) at batch B x
1024, for the Triton kernels ("auto"), the same with torch.compile, and the reference ops
(HYLA_BACKEND=reference). MFU = model FLOPs per token (train.trainer.model_flops_per_token) x tokens /
time / peak, with the peak both the datasheet bf16 dense rate and the matmul rate measured in this run.

    python bench/train_step.py --out profiles/train_step.json [--trace trace.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Hyla, get_config  # noqa: E402
from train.optim import build_optimizers  # noqa: E402
from train.trainer import model_flops_per_token, peak_flops  # noqa: E402


def timed(fn, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def roofline() -> dict:
    n = 1 << 30
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = median(timed(lambda: dst.copy_(src), 3, 20))
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = median(timed(lambda: a @ b, 3, 20))
    return {"copy_GBps": 2 * n / copy_ms / 1e6, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


# Kernel name patterns, first match wins: inductor's generated kernels (their names may quote source ops such as
# cudnn attention), cuBLAS / CUTLASS products, this repo's kernels, then the rest of aten's.
KERNEL_CATEGORIES = [
    ("inductor", r"^triton_(poi|per|red|tem)_"),
    ("matmul", r"nvjet|cutlass|gemm|xmma|splitKreduce"),
    ("gdn", r"^_(prep|state_out|bwd_state|bwd_out|bwd_wy)_kernel"),
    ("csa", r"^_(csa|compress)_"),
    ("conv", r"^_conv_silu_"),
    ("cross_entropy", r"^_xent_rows_kernel"),
    ("newton_schulz", r"^_(ns_stage|sym_products)_kernel"),
    ("sdpa", r"cudnn|fmha|flash"),
    ("foreach_and_adamw", r"multi_tensor_apply|adam"),
    ("other", r""),
]


def kernel_breakdown(trace: dict, top: int = 25) -> dict:
    """GPU kernel time of one profiled step (a torch.profiler chrome trace, loaded): summed by category
    (KERNEL_CATEGORIES) and by name, the `top` names by time, and the span from the first kernel's start to the
    last one's end (the profiler slows the host, so the span overstates the idle time of an unprofiled step)."""
    kernels = [e for e in trace["traceEvents"] if e.get("cat") == "kernel"]
    if not kernels:
        raise ValueError("the trace holds no kernel events (was CUDA activity profiled?)")
    by_name = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_name[e["name"]][0] += e["dur"] / 1e3
        by_name[e["name"]][1] += 1
    by_category = dict.fromkeys((c for c, _ in KERNEL_CATEGORIES), 0.0)
    for name, (ms, _) in by_name.items():
        by_category[next(c for c, rx in KERNEL_CATEGORIES if re.search(rx, name))] += ms
    names = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "span_ms": (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) / 1e3,
        "kernels_ms": sum(ms for ms, _ in by_name.values()),
        "by_category_ms": {c: ms for c, ms in sorted(by_category.items(), key=lambda kv: -kv[1]) if ms},
        "top": [{"name": n[:120], "ms": ms, "calls": calls} for n, (ms, calls) in names],
    }


def make_step(batch: int, seq: int, compile_: bool):
    """One training step of a fresh 95m model on random tokens: bf16 autocast forward + backward, grad
    clip, Muon + AdamW, grads cleared."""
    torch.manual_seed(0)
    cfg = get_config("95m")
    model = Hyla(cfg).cuda()
    opts = build_optimizers(model)
    fwd = torch.compile(model) if compile_ else model
    data = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")
    x, y = data[:, :-1], data[:, 1:]

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)

    return step


def bench_step(batch: int, seq: int, backend: str, compile_: bool, reps: int, trace: str | None = None) -> dict:
    os.environ["HYLA_BACKEND"] = backend
    cfg = get_config("95m")
    step = make_step(batch, seq, compile_)
    torch.cuda.reset_peak_memory_stats()
    times = timed(step, 3, reps)
    if trace:  # one more step under the profiler: kernels, nvtx ranges, launch gaps
        with torch.profiler.profile(record_shapes=True) as prof:
            step()
            torch.cuda.synchronize()
        prof.export_chrome_trace(trace)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    ms = median(times)
    breakdown = kernel_breakdown(json.loads(Path(trace).read_text())) if trace else None
    flops = model_flops_per_token(cfg, seq) * batch * seq
    row = {
        "backend": backend, "compile": compile_, "batch": batch, "seq": seq, "ms_median": ms,
        "ms_min": min(times), "tok_s": batch * seq / ms * 1e3, "achieved_TFLOPs": flops / ms / 1e9,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }  # fmt: skip
    if breakdown:
        row["profiled_step"] = breakdown
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="profiles/train_step.json")
    ap.add_argument(
        "--trace",
        default=None,
        help="chrome traces of one kernel step (eager, compiled): X.json -> X_eager.json, X_compiled.json",
    )
    args = ap.parse_args()
    dev = torch.device("cuda")
    roof = roofline()
    peak = peak_flops(dev)
    rows = []
    for backend, compile_ in [("auto", False), ("auto", True), ("reference", False)]:
        try:
            trace = None
            if args.trace and backend == "auto":
                trace = args.trace.replace(".json", "_compiled.json" if compile_ else "_eager.json")
            row = bench_step(args.batch, args.seq, backend, compile_, args.reps, trace)
            torch.cuda.empty_cache()
        except Exception as e:  # report the failure of one variant, keep the others
            row = {"backend": backend, "compile": compile_, "error": f"{type(e).__name__}: {e}"[:500]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = [r for r in rows if "error" not in r]
    best = min((r for r in ok if r["backend"] == "auto"), key=lambda r: r["ms_median"], default=None)
    ref = next((r for r in ok if r["backend"] == "reference"), None)
    for r in ok:
        r["mfu_datasheet"] = r["achieved_TFLOPs"] * 1e12 / peak if peak else None
        r["fraction_of_measured_matmul"] = r["achieved_TFLOPs"] / roof["bf16_matmul_TFLOPs"]
    summary = {}
    if best:
        summary = {
            f"mfu_B{args.batch}": best["mfu_datasheet"],
            f"peak_gib_B{args.batch}": best["peak_gib"],
            f"tok_s_B{args.batch}": best["tok_s"],
            "best_variant": f"{best['backend']}{' + compile' if best['compile'] else ''}",
        }
        if ref:
            summary["speedup_vs_reference"] = ref["ms_median"] / best["ms_median"]
    result = {
        "device": torch.cuda.get_device_name(dev),
        "versions": {
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "command": " ".join(["python", *sys.argv]),
        "flops_per_token": model_flops_per_token(get_config("95m"), args.seq),
        "peak_datasheet_TFLOPs": peak / 1e12 if peak else None,
        "roofline": roof,
        "rows": rows,
        "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    lines = [
        f"# 95m training step, {result['device']}",
        "",
        f"torch {torch.__version__}, triton {result['versions']['triton']}; batch {args.batch} x {args.seq}; "
        f"median of {args.reps} steps (CUDA events) after 3 warm-up steps; measured copy "
        f"{roof['copy_GBps']:.0f} GB/s, bf16 matmul {roof['bf16_matmul_TFLOPs']:.0f} TFLOP/s.",
        "",
        "| variant | ms/step | tok/s | TFLOP/s | MFU (datasheet) | of measured matmul | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"{r['backend']}{' + compile' if r['compile'] else ''}"
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:120]} | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['ms_median']:.1f} | {r['tok_s']:,.0f} | {r['achieved_TFLOPs']:.0f} | "
            f"{r['mfu_datasheet']:.1%} | {r['fraction_of_measured_matmul']:.1%} | {r['peak_gib']:.1f} |"
        )
    for r in rows:
        if "profiled_step" in r:
            k = r["profiled_step"]
            lines += ["", f"Kernels of one profiled step, {r['backend']}{' + compile' if r['compile'] else ''}: "
                      f"{k['kernels_ms']:.1f} ms in a span of {k['span_ms']:.1f} ms.", "",
                      "| category | ms |", "|---|---|"]  # fmt: skip
            lines += [f"| {c} | {ms:.2f} |" for c, ms in k["by_category_ms"].items()]
    lines += ["", f"Command: `{result['command']}`", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
