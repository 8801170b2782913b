"""Benchmark of the gated delta rule on one GPU: ours (Triton) vs flash-linear-attention vs the PyTorch
chunked reference, forward and forward+backward, bf16 inputs, g fp32; and, at the K = 112 shapes, the
same with q/k L2-normalized by the op (ours inside its kernels, fla's use_qk_l2norm_in_kernel, and ours
behind PyTorch's `l2norm` as the unfused comparison), reported as extra rows and `summary_l2norm`.

    PYTHONPATH=. python3 bench/gdn.py --out profiles   # writes gdn.json and gdn.md there

Timing: warm-up first, then the median of --reps samples, each CUDA events around CALLS = 10 calls back to
back (fwd_ms, fwdbwd_ms: the host runs ahead as in a training step, as bench/csa.py times; the summary's
ratios) and around single calls (*_latency_ms: host launch cost included, `summary_latency`); inputs rotated
over three sets so repeated calls do not run from L2. The forward is timed with inputs that require grad (a training
forward, which saves what the backward needs). Roofline: matmul FLOPs of the chunked algorithm over the
bf16 matmul rate, and the fewest bytes (each input read once, each output written once) over the copy
bandwidth, both measured in this run; the larger time is the floor, `roofline` is floor / measured.
Accuracy: relative error against the float64 chunked reference, on two sequences of the first shape of
each head size. Runs more than 7 minutes on an H100 (compiles, fla's autotuning, the reference, the float64
checks; sessions 5 and 6 were cut at 384 and ~415 s in fla's last shape); gdn.json / gdn.md are rewritten
after each shape (`complete` says whether every shape ran); --sweep and --profile come after the results
are written.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from kernels.gdn import gated_delta_rule, l2norm, reference, triton_bwd, triton_fwd

SHAPES = [(16, 1024, 9, 112), (64, 1024, 9, 112), (8, 4096, 16, 128)]
L2NORM_SHAPES = SHAPES[:2]
L2NORM_METHODS = ("ours_l2norm", "fla_l2norm", "ours_l2norm_torch")  # inputs: raw q, k
C = 64
CALLS = 10  # back-to-back calls per timing sample (the headline columns; `median_ms`)


def load_fla():
    """flash-linear-attention's chunk_gated_delta_rule, with its Hopper guard for Triton < 3.7.1 lifted
    (it refuses its gated backward there because of wrong results, its issue 640): for timing only."""
    try:
        import fla
        import fla.ops.common.chunk_o as chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as e:
        print(f"flash-linear-attention not available: {e}")
        return None, None, False
    lifted = not chunk_o.TRITON_ABOVE_3_7_1
    chunk_o.TRITON_ABOVE_3_7_1 = True
    return chunk_gated_delta_rule, fla.__version__, lifted


def median_ms(fn, sets, reps, warmup=5, calls=1):
    """Median milliseconds per call of fn over `reps` samples, each `calls` back-to-back calls between two
    CUDA events (inputs rotated over `sets`). calls=1 is the latency of one call, its host launch cost
    included; calls=CALLS lets the host run ahead as in a training step, so a GPU-bound method shows its GPU
    time and a host-bound one its host cost (as bench/csa.py times)."""
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for c in range(calls):
            fn(*sets[(i * calls + c) % len(sets)])
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def host_us(fn, x, n=30, rounds=5):
    """Host microseconds per fwd+bwd call on inputs x, issued back to back with one sync per round (median
    round; the GPU queue absorbs the work): the launch path's cost, which bounds the synced time at small
    batches. Measured on inputs already compiled for (a new shape would compile and autotune fla again)."""
    step = forward_backward(fn)
    step(*x)
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            step(*x)
        times.append((time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def forward(fn):
    return lambda q, k, v, g, b, do: fn(q, k, v, g, b)


def forward_backward(fn):
    return lambda q, k, v, g, b, do: torch.autograd.grad(fn(q, k, v, g, b), (q, k, v, g, b), do)


def ceilings():
    """Copy bandwidth (bytes read + written) and bf16 matmul rate on random data, measured here."""
    x = torch.randn(1 << 28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), [()], 20)
    bw = 2 * x.numel() * 4 / (ms * 1e-3)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = median_ms(lambda: a @ b, [()], 20)
    return bw, 2 * 8192**3 / (ms * 1e-3)


def counts(B, T, H, K, V):
    """(fwd FLOPs, fwd+bwd FLOPs, fwd bytes, fwd+bwd bytes): matmuls of the chunked algorithm; bytes of
    bf16 q, k, v, o, fp32 g, bf16 beta and, for the backward, do and every input gradient, each once."""
    n = B * H * -(-T // C)
    c2, c3, ckv = C * C, C**3, C * K * V
    fwd = 2 * n * (3 * c2 * K + 2 * c2 * V + 4 * c3 + 3 * ckv)
    bwd = 2 * n * (9 * c2 * K + 4 * c2 * V + 2 * c3 + 6 * ckv)
    tok = B * T * H
    io = tok * ((2 * K + 2 * V) * 2 + 4 + 2)
    return fwd, fwd + bwd, io, io + tok * ((4 * K + 4 * V) * 2 + 12)


def make_inputs(B, T, H, K, V, requires_grad=True, raw_qk=False):
    """Unit q, k rows (as after the L2 norm), or with `raw_qk` rows of norms 0.1-5 for the L2-norm methods."""
    q, k = (l2norm(torch.randn(B, T, H, K, device="cuda")) for _ in range(2))
    if raw_qk:
        q, k = (x * (0.1 + 4.9 * torch.rand(B, T, H, 1, device="cuda")) for x in (q, k))
    q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 3)
    beta = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, g, beta)]


def relerr(a, b):
    a, b = a.double(), b.double()
    return float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()


def accuracy_case(B, T, H, K, V, norm):
    """Inputs, an output gradient, and the float64 chunked reference's output and input gradients (with
    `norm`, on raw q, k that `l2norm` normalizes in float64 first)."""
    xs = make_inputs(B, T, H, K, V, raw_qk=norm)
    do = torch.randn(B, T, H, V, device="cuda")
    ref_xs = [x.detach().double().requires_grad_() for x in xs]
    q, k = (l2norm(ref_xs[0]), l2norm(ref_xs[1])) if norm else ref_xs[:2]
    ro = reference.chunk_gated_delta_rule(q, k, *ref_xs[2:])[0]
    ro.backward(do.double())
    return xs, do, ro.detach(), [x.grad for x in ref_xs]


def accuracy(fn, case):
    """Forward and per-gradient relative error of fn against the reference of `accuracy_case`."""
    xs, do, ro, rgrads = case
    xs = [x.detach().requires_grad_() for x in xs]
    o = fn(*xs)
    o.float().backward(do)
    fwd = relerr(o, ro)
    bwd = {n: relerr(x.grad, r) for n, x, r in zip(("dq", "dk", "dv", "dg", "dbeta"), xs, rgrads, strict=True)}
    return fwd, bwd


def live_mb(fn, x):
    """MiB that a training forward leaves allocated (its output and what it saves for the backward)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    o = fn(*x[:5])
    held = torch.cuda.memory_allocated() - before
    del o
    return held / 2**20


def resource_report():
    """Registers, spills and shared memory of every compiled kernel of ours (from Triton's cache)."""
    rows = []
    if not hasattr(triton_fwd._prep_kernel, "device_caches"):
        return rows
    kernels = [triton_fwd._prep_kernel, triton_fwd._state_out_kernel, triton_bwd._bwd_state_kernel]
    for kernel in [*kernels, triton_bwd._bwd_out_kernel, triton_bwd._bwd_wy_kernel]:
        for cache in getattr(kernel, "device_caches", {}).values():
            for ck in cache[0].values():
                ck._init_handles()
                rows.append(dict(kernel=kernel.fn.__name__, regs=ck.n_regs, spills=ck.n_spills,
                                 shared=ck.metadata.shared, warps=ck.metadata.num_warps))  # fmt: skip
    return rows


# one change of the launch configuration (triton_fwd.CONFIG) per entry, each timed against the default
SWEEP = [dict(state_bv=32), dict(state_bv=128, state_warps=8), dict(state_stages=3), dict(prep_warps=8),
         dict(out_bv=32), dict(wy_bv=64), dict(chunk_warps=8)]  # fmt: skip


def run_sweep(fn, reps, rounds=3):
    """fwd+bwd of ours at the two K = 112 shapes under each SWEEP change, the default included; the
    configurations are interleaved over `rounds` rounds and each reports its median over them (run-to-run
    drift of the GPU clock otherwise favours whichever configuration ran first)."""
    default, out = dict(triton_fwd.CONFIG), []
    for B, T, H, K in SHAPES[:2]:
        sets = [(*make_inputs(B, T, H, K, K), torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16))
                for _ in range(2)]  # fmt: skip
        changes = [{}, *SWEEP]
        times = [[] for _ in changes]
        for _ in range(rounds):
            for change, ts in zip(changes, times, strict=True):
                triton_fwd.CONFIG.update(change)
                try:
                    ts.append(median_ms(forward_backward(fn), sets, reps))
                except Exception as e:  # a configuration out of resources
                    ts.append(float("nan"))
                    print(f"sweep {change}: {type(e).__name__}: {str(e)[:200]}")
                triton_fwd.CONFIG.update(default)
        for change, ts in zip(changes, times, strict=True):
            out.append(dict(B=B, change=change, fwdbwd_ms=statistics.median(ts), rounds=ts))
            print(f"sweep B{B} {change}: fwd+bwd {out[-1]['fwdbwd_ms']:.3f} ms", flush=True)
    return out


def profile(methods, out_dir):
    """CUDA time per kernel for a few fwd+bwd calls at the two K = 112 shapes, written to gdn_profile.txt."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    text = []
    for (B, T, H, K), name in itertools.product(SHAPES[:2], ("ours", "fla")):
        if name not in methods:
            continue
        x = (*make_inputs(B, T, H, K, K), torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16))
        f = forward_backward(methods[name])
        for _ in range(3):
            f(*x)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                f(*x)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25)
        text.append(f"== {name}, B{B} T{T} H{H} K{K}, 5 fwd+bwd calls ==\n{table}")
        print(text[-1])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gdn_profile.txt"), "w") as f:
        f.write("\n".join(text))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="profiles")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time ours under other launch configurations")
    ap.add_argument("--profile", action="store_true", help="per-kernel CUDA times of ours and fla at B16 and B64")
    args = ap.parse_args()
    torch.manual_seed(0)
    fla_fn, fla_version, lifted = load_fla()
    bw, mm = ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s")

    def ours_fn(l2norm_in_op):
        return lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, use_qk_l2norm=l2norm_in_op, backend="triton")[0]

    plain = ours_fn(False)
    methods = {"ours": plain}
    if fla_fn is not None:
        methods["fla"] = lambda q, k, v, g, b: fla_fn(q, k, v, g, b, scale=q.shape[-1] ** -0.5)[0]
    if not args.no_reference:
        methods["reference"] = lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, backend="reference")[0]
    methods["ours_l2norm"] = ours_fn(True)
    if fla_fn is not None:
        methods["fla_l2norm"] = lambda q, k, v, g, b: fla_fn(
            q, k, v, g, b, scale=q.shape[-1] ** -0.5, use_qk_l2norm_in_kernel=True
        )[0]
    methods["ours_l2norm_torch"] = lambda q, k, v, g, b: plain(l2norm(q), l2norm(k), v, g, b)

    rows, acc, cases, host = [], {}, {}, {}

    def build_result(complete):
        summary, summary_l2norm, summary_latency = summarize(rows)
        return dict(
            device=torch.cuda.get_device_name(),
            versions=dict(
                torch=torch.__version__,
                triton=__import__("triton").__version__,
                fla=fla_version,
                cuda=torch.version.cuda,
            ),  # fmt: skip
            fla_hopper_guard_lifted=lifted,
            command="PYTHONPATH=. python3 " + " ".join(sys.argv),
            complete=complete,
            copy_bandwidth_bytes_per_s=bw,
            bf16_matmul_flop_per_s=mm,
            rows=rows,
            host_us_per_fwdbwd=host,
            launch_config=dict(triton_fwd.CONFIG),
            kernels=resource_report(),
            summary=summary,
            summary_l2norm=summary_l2norm,
            summary_latency=summary_latency,
        )

    for B, T, H, K in SHAPES:
        V = K
        fl_f, fl_fb, by_f, by_fb = counts(B, T, H, K, V)
        floor_f, floor_fb = max(fl_f / mm, by_f / bw), max(fl_fb / mm, by_fb / bw)
        do = [torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        sets = [(*make_inputs(B, T, H, K, V), do[i]) for i in range(3)]
        raw_sets = (
            [(*make_inputs(B, T, H, K, V, raw_qk=True), do[i]) for i in range(3)]
            if ((B, T, H, K) in L2NORM_SHAPES)
            else None
        )
        for name, fn in methods.items():
            norm = name in L2NORM_METHODS
            if (name == "reference" and B * T * H > 2e5) or (norm and (B, T, H, K) not in L2NORM_SHAPES):
                continue  # the reference: minutes per call at this size
            if name != "reference" and (name, K) not in acc:
                if (K, norm) not in cases:
                    cases[(K, norm)] = accuracy_case(min(B, 2), T, H, K, V, norm)
                acc[(name, K)] = accuracy(fn, cases[(K, norm)])
            x = raw_sets if norm else sets
            try:
                calls = 1 if name == "reference" else CALLS  # the reference: seconds per call
                t_f = median_ms(forward(fn), x, args.reps, calls=calls)
                t_fb = median_ms(forward_backward(fn), x, args.reps, calls=calls)
                lat_f, lat_fb = (
                    (t_f, t_fb)
                    if calls == 1
                    else (median_ms(forward(fn), x, args.reps), median_ms(forward_backward(fn), x, args.reps))
                )
            except RuntimeError as e:  # e.g. out of memory in the reference
                print(f"{name} {B, T, H, K}: {e}")
                continue
            row = dict(method=name, B=B, T=T, H=H, K=K, V=V, fwd_ms=t_f, fwdbwd_ms=t_fb, fwd_latency_ms=lat_f,
                       fwdbwd_latency_ms=lat_fb,
                       fwd_tokens_per_s=B * T / (t_f * 1e-3), fwdbwd_tokens_per_s=B * T / (t_fb * 1e-3),
                       fwd_roofline=floor_f / (t_f * 1e-3), fwdbwd_roofline=floor_fb / (t_fb * 1e-3),
                       fwd_live_mib=live_mb(fn, x[0]))  # fmt: skip
            if (name, K) in acc:
                row["relerr_fwd"], row["relerr_bwd"] = acc[(name, K)][0], max(acc[(name, K)][1].values())
                row["relerr_grads"] = acc[(name, K)][1]
            rows.append(row)
            if name != "reference" and (B, T, H, K) == SHAPES[0]:
                host[name] = host_us(fn, x[0])
            print(f"{name:9s} B{B:3d} T{T} H{H} K{K}: fwd {t_f:8.3f} ms  fwd+bwd {t_fb:8.3f} ms  "
                  f"roofline {row['fwd_roofline']:.3f} / {row['fwdbwd_roofline']:.3f}  "
                  f"err {row.get('relerr_fwd', float('nan')):.1e} / {row.get('relerr_bwd', float('nan')):.1e}",
                  flush=True)  # fmt: skip
        del sets, raw_sets, do
        cases.clear()  # every method has its errors at this K now
        torch.cuda.empty_cache()
        write(build_result(complete=False), args.out)  # a run cut by a time limit keeps the shapes done

    result = build_result(complete=True)
    write(result, args.out)
    print(markdown(result))
    if args.profile:
        profile(methods, args.out)
    if args.sweep:  # last: a configuration that fails must not cost the results above
        result["sweep"] = run_sweep(methods["ours"], args.reps)
        write(result, args.out)


def summarize(rows):
    """The summary keys (ours vs fla, no norm) and the L2-norm ones, from the rows measured so far (None
    where a row is missing)."""

    def speedup(B, base="fla", new="ours", key="fwdbwd_ms"):
        t = {r["method"]: r[key] for r in rows if r["B"] == B and r["K"] == 112}
        return t[base] / t[new] if base in t and new in t else None

    def worst(method, key):
        vals = [r[key] for r in rows if r["method"] == method and key in r]
        return max(vals) if vals else None

    summary = dict(
        speedup_fwdbwd_vs_fla_B16=speedup(16),
        speedup_fwdbwd_vs_fla_B64=speedup(64),
        max_relerr_fwd=worst("ours", "relerr_fwd"),
        max_relerr_bwd=worst("ours", "relerr_bwd"),
    )
    if worst("fla", "relerr_fwd") is not None:
        summary["fla_max_relerr_fwd"] = worst("fla", "relerr_fwd")
        summary["fla_max_relerr_bwd"] = worst("fla", "relerr_bwd")
    summary_l2norm = dict(
        speedup_fwdbwd_vs_fla_l2norm_B16=speedup(16, "fla_l2norm", "ours_l2norm"),
        speedup_fwdbwd_vs_fla_l2norm_B64=speedup(64, "fla_l2norm", "ours_l2norm"),
        speedup_fwdbwd_fused_vs_torch_l2norm_B16=speedup(16, "ours_l2norm_torch", "ours_l2norm"),
        speedup_fwdbwd_fused_vs_torch_l2norm_B64=speedup(64, "ours_l2norm_torch", "ours_l2norm"),
        max_relerr_fwd=worst("ours_l2norm", "relerr_fwd"),
        max_relerr_bwd=worst("ours_l2norm", "relerr_bwd"),
    )
    summary_latency = dict(  # single synced calls: the host's launch path before the first kernel counts
        speedup_fwdbwd_vs_fla_B16=speedup(16, key="fwdbwd_latency_ms"),
        speedup_fwdbwd_vs_fla_B64=speedup(64, key="fwdbwd_latency_ms"),
    )
    return summary, summary_l2norm, summary_latency


def write(result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gdn.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "gdn.md"), "w") as f:
        f.write(markdown(result))


def markdown(res):
    s = res["summary"]
    lines = [
        "# Gated delta rule: Triton (ours) vs flash-linear-attention vs PyTorch chunked reference",
        "",
        f"Device {res['device']}; torch {res['versions']['torch']}, triton {res['versions']['triton']}, "
        f"fla {res['versions']['fla']}. Copy {res['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {res['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s (measured in the same run).",
        "",
        f"Command: `{res['command']}`",
        "",
        *([] if res.get("complete", True) else ["**Incomplete run**: written after the last shape measured.", ""]),
        f"bf16 q/k/v/beta, fp32 g, K = V, no initial state. Medians of CUDA-event timings per call, {CALLS} "
        "calls back to back per sample (the host runs ahead as in a training step; the summary's ratios), and"
        " the latency of single synced calls (lat. columns: host launch cost included; summary_latency); fwd "
        "is a training forward (inputs require grad). Roofline = max(FLOPs / matmul rate, fewest bytes / copy"
        " bandwidth) / measured (FLOPs and bytes without the L2 norm). Errors: relative to the float64 "
        "chunked reference (bwd = worst of dq, dk, dv, dg, dbeta). Live MiB: what a training forward leaves "
        "allocated (output and saved tensors). *_l2norm rows: q, k of row norms 0.1-5, normalized by the op "
        "(ours in its kernels, fla by use_qk_l2norm_in_kernel, ours_l2norm_torch by PyTorch `l2norm` in front"
        " of ours); their reference normalizes in float64.",
        "",
        "| method | B | T | H | K | fwd ms | fwd+bwd ms | fwd lat. ms | fwd+bwd lat. ms | fwd+bwd tok/s "
        "| roofline fwd | roofline fwd+bwd | relerr fwd | relerr bwd | live MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {r['B']} | {r['T']} | {r['H']} | {r['K']} | {r['fwd_ms']:.3f} | "
            f"{r['fwdbwd_ms']:.3f} | {r['fwd_latency_ms']:.3f} | {r['fwdbwd_latency_ms']:.3f} | "
            f"{r['fwdbwd_tokens_per_s']:.3g} | {r['fwd_roofline']:.3f} | "
            f"{r['fwdbwd_roofline']:.3f} | {r.get('relerr_fwd', float('nan')):.1e} | "
            f"{r.get('relerr_bwd', float('nan')):.1e} | {r.get('fwd_live_mib', float('nan')):.0f} |"
        )
    fmt = [f"{k} = {v:.4g}" if v is not None else f"{k} = n/a" for k, v in s.items()]
    lines += ["", "Summary: " + ", ".join(fmt)]
    if res.get("summary_latency"):
        fmt = [f"{k} = {v:.4g}" if v is not None else f"{k} = n/a" for k, v in res["summary_latency"].items()]
        lines += ["", "Single synced calls (summary_latency): " + ", ".join(fmt)]
    if res.get("summary_l2norm"):
        fmt = [f"{k} = {v:.4g}" if v is not None else f"{k} = n/a" for k, v in res["summary_l2norm"].items()]
        lines += ["", "With the q/k L2 norm (summary_l2norm): " + ", ".join(fmt)]
    host = res.get("host_us_per_fwdbwd")
    if host:
        lines += [
            "",
            "Host time per fwd+bwd call at the first shape (issued back to back): "
            + ", ".join(f"{k} {v:.0f} us" for k, v in host.items()),
        ]
    if res["fla_hopper_guard_lifted"]:
        lines += [
            "",
            "flash-linear-attention's guard that refuses its gated backward on Hopper with Triton < 3.7.1 "
            "(its issue 640) was lifted for timing; its errors above are what it computes there.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
