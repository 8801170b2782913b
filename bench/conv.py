"""Benchmark of the causal depthwise conv + SiLU (GDN's short conv) at the model's shape, on one GPU.

    PYTHONPATH=. python3 bench/conv.py --out profiles [--sweep]   # writes conv.json and conv.md there

Side by side in one run, bf16 x [B, T, 3024], fp32 weight [3024, 4] (cast to bf16 where the op needs it):
ours (Triton, `kernels.conv`), cuDNN's grouped conv1d + SiLU on the transposed layout (what the model
used before), the shifted-sum PyTorch reference eager and under torch.compile. Forward and forward +
backward (dx and dw), CUDA-event medians. Roofline: fewest bytes (fwd: read x, write y; bwd: read x and dy,
write dx; 2 bytes each) over the copy bandwidth measured in the same run. Accuracy: relative error of y,
dx, dw against the float64 reference on the first two sequences.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from bench.gdn import ceilings, median_ms
from kernels.conv import causal_conv1d_silu, reference, triton_conv

SHAPES = [(16, 1024, 3024, 4), (32, 1024, 3024, 4)]


def cudnn_conv_silu(x, w):
    """The model's session-2 form: F.conv1d(groups=C) over [B, C, T] with W - 1 zeros in front."""
    C, W = w.shape
    xt = F.pad(x.transpose(1, 2), (W - 1, 0))
    return F.silu(F.conv1d(xt, w.to(x.dtype)[:, None], groups=C)).transpose(1, 2)


def methods():
    return {
        "ours": causal_conv1d_silu,
        "cudnn": cudnn_conv_silu,
        "reference": reference.causal_conv1d_silu,
        "reference_compiled": torch.compile(reference.causal_conv1d_silu),
    }


def make_sets(B, T, C, W, n=3):
    sets = []
    for _ in range(n):
        x = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(C, W, device="cuda") / W**0.5).requires_grad_()
        sets.append((x, w, torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16)))
    return sets


def fwd(fn):
    return lambda x, w, dy: fn(x, w)


def fwd_bwd(fn):
    return lambda x, w, dy: torch.autograd.grad(fn(x, w), (x, w), dy)


def relerrs(fn, x, w, dy):
    x, w, dy = x[:2].detach().requires_grad_(), w.detach().requires_grad_(), dy[:2]
    y = fn(x, w)
    ours = (y, *torch.autograd.grad(y, (x, w), dy))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = reference.causal_conv1d_silu(x64, w64)
    ref = (y64, *torch.autograd.grad(y64, (x64, w64), dy.double()))
    return [((o.double() - r).norm() / r.norm()).item() for o, r in zip(ours, ref, strict=True)]


def sweep(reps):
    """Candidate configurations per kernel at the larger shape, interleaved over 3 rounds."""
    sets = make_sets(*SHAPES[-1])
    cands = {
        "fwd": [(8, 128, 4), (16, 128, 4), (32, 128, 8), (8, 256, 8)],  # (rows, channels, warps)
        "bwd": [(32, 128, 1), (64, 128, 1), (128, 128, 1), (64, 64, 1), (64, 256, 2)],  # (segment, channels, warps)
    }
    keep = dict(triton_conv.CONFIG)
    times = {(k, c): [] for k, cs in cands.items() for c in cs}
    for _ in range(3):
        for kind, cand in times:
            triton_conv.CONFIG.update(keep, **{kind: cand})
            fn = fwd(causal_conv1d_silu) if kind == "fwd" else fwd_bwd(causal_conv1d_silu)
            times[kind, cand].append(median_ms(fn, sets, reps))
    triton_conv.CONFIG.update(keep)
    rows = [{"kernel": k, "config": c, "ms": sorted(t)[1]} for (k, c), t in times.items()]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="profiles")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    bw, mm = ceilings()
    rows = []
    for B, T, C, W in SHAPES:
        sets = make_sets(B, T, C, W)
        n = B * T * C
        for name, fn in methods().items():
            row = {"method": name, "B": B, "T": T, "C": C, "W": W}
            row["fwd_ms"] = median_ms(fwd(fn), sets, args.reps)
            row["fwdbwd_ms"] = median_ms(fwd_bwd(fn), sets, args.reps)
            row["roofline_fwd"] = 4 * n / bw / (row["fwd_ms"] * 1e-3)
            row["roofline_fwdbwd"] = 10 * n / bw / (row["fwdbwd_ms"] * 1e-3)
            row["relerr"] = max(relerrs(fn, *sets[0]))  # worst of y, dx, dw
            rows.append(row)
            print(json.dumps(row), flush=True)
    by = {(r["method"], r["B"]): r for r in rows}
    summary = {}
    for B, *_ in SHAPES:
        for other in ("cudnn", "reference_compiled"):
            summary[f"speedup_fwdbwd_vs_{other}_B{B}"] = by[other, B]["fwdbwd_ms"] / by["ours", B]["fwdbwd_ms"]
    summary["max_relerr"] = max(r["relerr"] for r in rows if r["method"] == "ours")
    result = {
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
        "command": "PYTHONPATH=. python3 " + " ".join(sys.argv),
        "copy_GBps": bw / 1e9,
        "bf16_matmul_TFLOPs": mm / 1e12,
        "config": triton_conv.CONFIG,
        "rows": rows,
        "summary": summary,
    }
    if args.sweep:
        result["sweep"] = sweep(args.reps)
    with open(f"{args.out}/conv.json", "w") as f:
        json.dump(result, f, indent=1)
    lines = [
        "# Causal depthwise conv + SiLU (GDN short conv): Triton (ours) vs cuDNN grouped conv1d vs PyTorch",
        "",
        f"Device {result['device']}; torch {torch.__version__}, triton {result['versions']['triton']}. "
        f"Copy {bw / 1e12:.2f} TB/s (measured in the same run). Command: `{result['command']}`",
        "",
        "bf16 x [B, T, C], fp32 weight [C, W]; medians of CUDA-event timings; fwd+bwd = dx and dw. "
        "Roofline = fewest bytes / copy bandwidth / measured. Errors: relative to float64, worst of y, dx, dw.",
        "",
        "| method | B | T | C | fwd ms | fwd+bwd ms | roofline fwd | roofline fwd+bwd | relerr |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['B']} | {r['T']} | {r['C']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | "
            f"{r['roofline_fwd']:.2f} | {r['roofline_fwdbwd']:.2f} | {r['relerr']:.1e} |"
        )
    lines += ["", "Summary: " + ", ".join(f"{k} = {v:.3g}" for k, v in summary.items()), ""]
    with open(f"{args.out}/conv.md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
