"""CPU inference benchmark: the C engine (csrc/, fp32 and int8) vs PyTorch CPU incremental decoding of
the same 95m model (random weights), with 1 and 2 threads, and the memory bandwidth measured around
every engine run.

Protocol (the machine may be shared with other jobs, so every number is a sample, not a constant):
  - every sample runs in a fresh subprocess (PyTorch and the engine bring separate OpenMP runtimes);
  - repeats are interleaved: each repeat runs every engine once per thread count, in an order rotated
    per repeat (fp32, int8, torch / int8, torch, fp32 / ...), so slow and quiet periods spread over all
    engines instead of hitting one engine's block of repeats;
  - right before and right after each engine sample, separate processes measure with the same thread
    count the copy bandwidth (torch copy of a 256 MiB fp32 array, bytes read + written per second, best
    of 10), torch's read bandwidth (a sum over it) and the engine's own read bandwidth
    (pyhyla.read_bandwidth: a parallel integer sum over 256 MiB of huge pages, each thread one contiguous
    range, as decoding streams weights; best of 10);
  - before each sample the driver waits (up to --max-wait s, in 20 s steps) until the other processes
    use less than --quiet of the cores (from /proc/stat over 1 s while the benchmark itself is idle; the
    1-minute load average counts this benchmark's own previous runs), and records that busy fraction and
    the `uptime` load averages;
  - engine sample: C: decode = 128 tokens one at a time after a 64-token prefill (teacher-forced on
    fixed random ids), 3 passes; prefill = 512 tokens in one call, 2 passes. PyTorch: model(idx,
    cache=cache), 64 tokens per decode pass (it is ~15x slower), 2 passes; prefill 512 ids, 2 passes.
    A sample's rate is the best of its passes;
  - per engine and thread count the JSON keeps all samples; the summary reports the median and the best
    over the repeats. Ratios (int8 / fp32, int8 / PyTorch) use medians of the same thread count.
Bandwidth fractions: fp32 decoding reads every weight once per token (4 x params bytes, tied head), int8
about the int8 file's bytes; bytes per token x tokens/s over the higher of the two bandwidths measured
around that sample. The copy figure is the issue's reference; decoding only reads, and the engine's
read probe is the stricter ceiling (torch's 2-thread copy and sum stay below what 2 threads can read).
OpenMP: the engine runs with libgomp's defaults (OMP_WAIT_POLICY unset: spin, then sleep); the JSON
records the environment. With OMP_WAIT_POLICY=passive every fork/join costs a futex wake-up (~46 us
measured here vs ~1.4 us spinning) and decoding does ~80 of them per token.
Parity: max |logit difference| of c_fp32 vs torch over the 64 decoding steps both ran in repeat 0.

    python bench/cpu_infer.py --out profiles          # writes cpu_infer.json and cpu_infer.md there
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT, DECODE, DECODE_TORCH, PREFILL = 64, 128, 64, 512
ENGINES = ("c_fp32", "c_int8", "torch")


def build(build_dir: Path, native: bool) -> None:
    import pybind11

    flags = [f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython3_EXECUTABLE={sys.executable}"]
    flags.append(f"-DHYLA_NATIVE={'ON' if native else 'OFF'}")
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", *flags], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run(["cmake", "--build", str(build_dir), "-j"], check=True, capture_output=True)


# ----------------------------------------------------------------------------- workers (subprocesses)


def worker_bandwidth(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    copies, reads = [], []
    for _ in range(12):
        t = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t)
    for _ in range(12):
        t = time.perf_counter()
        src.sum()
        reads.append(time.perf_counter() - t)
    nbytes = src.numel() * 4
    return {"copy_GBps": 2 * nbytes / min(copies[2:]) / 1e9, "read_GBps": nbytes / min(reads[2:]) / 1e9}


def worker_read(threads: int, build_dir: str) -> dict:
    sys.path.insert(0, build_dir)
    import pyhyla

    return {"c_read_GBps": pyhyla.read_bandwidth(threads)}


def timed_passes(passes: int, tokens: int, run) -> list[float]:
    rates = []
    for _ in range(passes):
        t = time.perf_counter()
        run()
        rates.append(tokens / (time.perf_counter() - t))
    return rates


def worker_c(threads: int, model_bin: str, ids: np.ndarray, build_dir: str, logits_out: str | None) -> dict:
    sys.path.insert(0, build_dir)
    import pyhyla

    eng = pyhyla.Engine(model_bin, threads=threads)
    logits: list[np.ndarray] = []

    def decode() -> float:  # seconds for DECODE tokens after a PROMPT-token prefill
        eng.reset()
        eng.prefill(ids[:PROMPT].tolist())
        logits.clear()
        t0 = time.perf_counter()
        for tok in ids[PROMPT : PROMPT + DECODE]:
            logits.append(eng.forward(int(tok)))
        return time.perf_counter() - t0

    rates = [DECODE / decode() for _ in range(3)]

    def prefill() -> None:
        eng.reset()
        eng.prefill(ids[:PREFILL].tolist())

    prefill_rates = timed_passes(2, PREFILL, prefill)
    if logits_out:
        np.save(logits_out, np.stack(logits[:DECODE_TORCH]))
    return {"decode_passes": rates, "prefill_passes": prefill_rates}


def worker_torch(threads: int, state: str, ids: np.ndarray, logits_out: str | None) -> dict:
    import torch

    from model import Hyla, get_config

    torch.set_num_threads(threads)
    model = Hyla(get_config("95m")).eval()
    model.load_state_dict(torch.load(state, weights_only=True))
    idx = torch.from_numpy(ids).long()[None]
    rates, prefill_rates = [], []
    with torch.inference_mode():
        for _ in range(2):
            cache = model.new_cache()
            model(idx[:, :PROMPT], cache=cache)
            logits = []
            t = time.perf_counter()
            for i in range(PROMPT, PROMPT + DECODE_TORCH):
                logits.append(model(idx[:, i : i + 1], cache=cache)[0, -1].numpy())
            rates.append(DECODE_TORCH / (time.perf_counter() - t))
        for _ in range(2):
            t = time.perf_counter()
            model(idx[:, :PREFILL], cache=model.new_cache())
            prefill_rates.append(PREFILL / (time.perf_counter() - t))
    if logits_out:
        np.save(logits_out, np.stack(logits))
    return {"decode_passes": rates, "prefill_passes": prefill_rates}


def spawn(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- machine state


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all cores busy (any process) over `seconds`, from /proc/stat."""

    def read() -> tuple[int, int]:
        f = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = f[3] + f[4]
        return sum(f[:8]) - idle, sum(f[:8])

    b0, t0 = read()
    time.sleep(seconds)
    b1, t1 = read()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_quiet(quiet: float, max_wait: float) -> dict:
    """Wait until other processes keep less than `quiet` of the cores busy (or max_wait passed)."""
    waited, busy = 0.0, cpu_busy()
    while busy > quiet and waited < max_wait:
        time.sleep(20)
        waited += 21
        busy = cpu_busy()
    return {"busy_before": round(busy, 3), "waited_s": waited, "loadavg": [round(v, 2) for v in os.getloadavg()]}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma")))
    return []


# ----------------------------------------------------------------------------- driver


def sample(engine: str, n: int, tmp: Path, build_dir: Path, logits_out: str | None, args) -> dict:
    state = wait_quiet(args.quiet, args.max_wait)
    before = spawn("bw", str(n)) | spawn("read", str(n), str(build_dir))
    ids = str(tmp / "ids.npy")
    extra = [logits_out] if logits_out else []
    if engine == "torch":
        res = spawn("torch", str(n), str(tmp / "state.pt"), ids, *extra)
    else:
        model = tmp / ("model.bin" if engine == "c_fp32" else "model8.bin")
        res = spawn("c", str(n), str(model), ids, str(build_dir), *extra)
    after = spawn("bw", str(n)) | spawn("read", str(n), str(build_dir))
    res.update(state, bw_before=before, bw_after=after, loadavg_after=[round(v, 2) for v in os.getloadavg()])
    res["decode_tok_s"], res["prefill_tok_s"] = max(res["decode_passes"]), max(res["prefill_passes"])
    res["copy_GBps"] = max(before["copy_GBps"], after["copy_GBps"])
    res["read_GBps"] = max(before["read_GBps"], after["read_GBps"])
    res["c_read_GBps"] = max(before["c_read_GBps"], after["c_read_GBps"])
    return res


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "best": max(values), "min": min(values)}


def summarize(samples: dict, bytes_per_token: dict, threads: list[int]) -> dict:
    """Per engine and thread count: median / best of the decode and prefill rates and of the bandwidth
    fractions; the summary takes each engine's thread count with the highest median decode rate."""
    table: dict = {}
    for n in threads:
        for e in ENGINES:
            ss = samples[str(n)][e]
            row = {"decode": stats([s["decode_tok_s"] for s in ss]), "prefill": stats([s["prefill_tok_s"] for s in ss])}
            if e in bytes_per_token:
                gbps = [s["decode_tok_s"] * bytes_per_token[e] / 1e9 for s in ss]
                row["weight_GBps"] = stats(gbps)
                row["fraction_of_copy"] = stats([g / s["copy_GBps"] for g, s in zip(gbps, ss, strict=True)])
                row["fraction_of_torch_read"] = stats([g / s["read_GBps"] for g, s in zip(gbps, ss, strict=True)])
                row["fraction_of_read"] = stats([g / s["c_read_GBps"] for g, s in zip(gbps, ss, strict=True)])
            row["copy_GBps"] = stats([s["copy_GBps"] for s in ss])
            row["torch_read_GBps"] = stats([s["read_GBps"] for s in ss])
            row["read_GBps"] = stats([s["c_read_GBps"] for s in ss])
            table.setdefault(str(n), {})[e] = row
        fp32, int8 = table[str(n)]["c_fp32"]["decode"], table[str(n)]["c_int8"]["decode"]
        torch = table[str(n)]["torch"]["decode"]
        table[str(n)]["int8_vs_fp32"] = int8["median"] / fp32["median"]
        table[str(n)]["int8_vs_torch"] = int8["median"] / torch["median"]
        # per repeat (the engines ran back to back): the spread of the ratio
        pairs = zip(samples[str(n)]["c_int8"], samples[str(n)]["c_fp32"], strict=True)
        table[str(n)]["int8_vs_fp32_per_repeat"] = [i["decode_tok_s"] / f["decode_tok_s"] for i, f in pairs]
    top = {e: max(threads, key=lambda n: table[str(n)][e]["decode"]["median"]) for e in ENGINES}
    med = {e: table[str(top[e])][e]["decode"]["median"] for e in ENGINES}
    n_fp32 = str(top["c_fp32"])
    summary = {
        "decode_tok_s_fp32": med["c_fp32"],
        "decode_tok_s_int8": med["c_int8"],
        "decode_tok_s_torch_cpu": med["torch"],
        "threads": {e: top[e] for e in ENGINES},
        "decode_tok_s_best": {e: max(table[str(n)][e]["decode"]["best"] for n in threads) for e in ENGINES},
        "speedup_vs_torch_cpu": med["c_int8"] / med["torch"],
        "speedup_fp32_vs_torch_cpu": med["c_fp32"] / med["torch"],
        "speedup_int8_vs_fp32": med["c_int8"] / med["c_fp32"],
        "int8_vs_fp32_by_threads": {n: table[str(n)]["int8_vs_fp32"] for n in threads},
        "int8_vs_torch_by_threads": {n: table[str(n)]["int8_vs_torch"] for n in threads},
        "fp32_fraction_of_copy_bandwidth": table[n_fp32]["c_fp32"]["fraction_of_copy"]["median"],
        "fp32_fraction_of_read_bandwidth": table[n_fp32]["c_fp32"]["fraction_of_read"]["median"],
        "fp32_fraction_of_copy_by_threads": {n: table[str(n)]["c_fp32"]["fraction_of_copy"]["median"] for n in threads},
        "int8_fraction_of_copy_by_threads": {n: table[str(n)]["c_int8"]["fraction_of_copy"]["median"] for n in threads},
        "fp32_fraction_of_read_by_threads": {n: table[str(n)]["c_fp32"]["fraction_of_read"]["median"] for n in threads},
        "int8_fraction_of_read_by_threads": {n: table[str(n)]["c_int8"]["fraction_of_read"]["median"] for n in threads},
    }
    return {"summary": summary, "table": table}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="profiles")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--quiet", type=float, default=0.25, help="wait until others keep less than this of the cores busy")
    p.add_argument("--max-wait", type=float, default=90, help="seconds to wait for that before each sample")
    p.add_argument("--build-dir", default=str(ROOT / "build" / "bench"))
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, threads, rest = args.worker[0], int(args.worker[1]), args.worker[2:]
        if kind == "bw":
            res = worker_bandwidth(threads)
        elif kind == "read":
            res = worker_read(threads, rest[0])
        elif kind == "c":
            res = worker_c(threads, rest[0], np.load(rest[1]), rest[2], rest[3] if len(rest) > 3 else None)
        else:
            res = worker_torch(threads, rest[0], np.load(rest[1]), rest[2] if len(rest) > 2 else None)
        print(json.dumps(res))
        return

    import torch

    from model import Hyla, get_config
    from train.export import export_model

    build_dir = Path(args.build_dir)
    build(build_dir, native=False)
    threads = [int(t) for t in args.threads.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="hyla_bench_") as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        cfg = get_config("95m")
        model = Hyla(cfg)
        torch.save(model.state_dict(), tmp / "state.pt")
        fp32_bytes = export_model(model.state_dict(), cfg, tmp / "model.bin")
        int8_bytes = export_model(model.state_dict(), cfg, tmp / "model8.bin", quant="int8")
        weight_bytes = sum(p.numel() for p in model.parameters()) * 4  # read once per decoded token (tied head)
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, PREFILL).astype(np.int64)
        np.save(tmp / "ids.npy", ids)
        del model

        samples: dict = {str(n): {e: [] for e in ENGINES} for n in threads}
        for r in range(args.repeats):
            order = ENGINES[r % 3 :] + ENGINES[: r % 3]
            for n in threads:
                for e in order:
                    parity = r == 0 and n == threads[0] and e in ("c_fp32", "torch")
                    lg = str(tmp / f"{e}.npy") if parity else None
                    s = sample(e, n, tmp, build_dir, lg, args)
                    samples[str(n)][e].append(s)
                    print(f"repeat {r} threads {n} {e}: decode {s['decode_tok_s']:.1f} tok/s, prefill "
                          f"{s['prefill_tok_s']:.1f}, copy {s['copy_GBps']:.1f} GB/s, busy before "
                          f"{s['busy_before']:.2f}, load {s['loadavg'][0]:.2f}", flush=True)  # fmt: skip

        c_logits, t_logits = np.load(tmp / "c_fp32.npy"), np.load(tmp / "torch.npy")
    parity_abs = float(np.abs(c_logits - t_logits).max())
    res = summarize(samples, {"c_fp32": weight_bytes, "c_int8": int8_bytes}, threads)
    res["summary"].update(parity_max_abs=parity_abs, parity_max_rel=parity_abs / float(np.abs(t_logits).max()))
    result = {
        "summary": res["summary"],
        "note": "decode rates are medians over interleaved repeats (fresh processes) at each engine's best thread "
        "count; ratios are ratios of medians; every sample is under samples",
        "device": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "compiler": subprocess.run(["cc", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "started": started,
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_"))},
        "model": {
            "preset": "95m",
            "params": weight_bytes // 4,
            "fp32_file_bytes": fp32_bytes,
            "int8_file_bytes": int8_bytes,
            "weight_bytes_per_token_fp32": weight_bytes,
        },  # fmt: skip
        "protocol": {
            "prompt": PROMPT,
            "decode_tokens_c": DECODE,
            "decode_tokens_torch": DECODE_TORCH,
            "prefill_tokens": PREFILL,
            "repeats": args.repeats,
            "quiet": args.quiet,
            "max_wait_s": args.max_wait,
        },  # fmt: skip
        "table": res["table"],
        "samples": samples,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_infer.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "cpu_infer.md").write_text(markdown(result))
    print(json.dumps(result["summary"], indent=2))


def markdown(res: dict) -> str:
    s, table = res["summary"], res["table"]
    env = ", ".join(f"{k}={v}" for k, v in res["omp_env"].items()) or "none set (libgomp defaults)"
    lines = [
        "# CPU inference: C engine vs PyTorch CPU (95m, random weights)",
        "",
        f"Device: {res['device']}, {res['cores']} cores ({', '.join(res['cpu_flags'])}); torch {res['torch']}, "
        f"Python {res['python']}, {res['compiler']}; OpenMP environment: {env}. Started {res['started']}.",
        f"Command: `{res['command']}` (portable build: no -march=native; int8 uses the AVX-512 VNNI kernel "
        "when the CPU has it).",
        "",
        f"{res['protocol']['repeats']} interleaved repeats, each engine in a fresh process; decode tokens/s as median "
        "[min, best] over the repeats; bandwidth measured right before and after each sample with the same "
        "threads (the higher of the two is the reference; copy = torch copy_, read = the engine's parallel read "
        "probe; medians):",
        "",
        "| threads | engine | decode tok/s | prefill tok/s (median) | weight GB/s | of copy bw | of read bw "
        "| copy GB/s | read GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, rows in table.items():
        for e in ENGINES:
            row = rows[e]
            d = row["decode"]
            frac = (
                f"{row['weight_GBps']['median']:.1f} | {row['fraction_of_copy']['median']:.0%} | "
                f"{row['fraction_of_read']['median']:.0%}"
                if "weight_GBps" in row
                else "- | - | -"
            )
            lines.append(
                f"| {n} | {e} | {d['median']:.1f} [{d['min']:.1f}, {d['best']:.1f}] | {row['prefill']['median']:.1f} | "
                f"{frac} | {row['copy_GBps']['median']:.1f} | {row['read_GBps']['median']:.1f} |"
            )
    lines += ["", "| threads | int8 / fp32 (ratio of medians) | per repeat | int8 / PyTorch |", "|---|---|---|---|"]
    for n, rows in table.items():
        per = ", ".join(f"{v:.2f}" for v in rows["int8_vs_fp32_per_repeat"])
        lines.append(f"| {n} | {rows['int8_vs_fp32']:.2f} | {per} | {rows['int8_vs_torch']:.1f} |")
    lines += [
        "",
        "Summary (medians, each engine at its faster thread count: "
        + ", ".join(f"{e} {n}" for e, n in s["threads"].items())
        + f"): C fp32 "
        f"{s['decode_tok_s_fp32']:.1f} tok/s, C int8 {s['decode_tok_s_int8']:.1f} tok/s, PyTorch "
        f"{s['decode_tok_s_torch_cpu']:.1f} tok/s: int8 {s['speedup_vs_torch_cpu']:.1f}x PyTorch and "
        f"{s['speedup_int8_vs_fp32']:.2f}x our fp32; fp32 {s['speedup_fp32_vs_torch_cpu']:.1f}x PyTorch at "
        f"{s['fp32_fraction_of_copy_bandwidth']:.0%} of the copy ({s['fp32_fraction_of_read_bandwidth']:.0%} of the "
        f"read) bandwidth. Parity (C fp32 vs PyTorch, 64 decoding steps): max |diff| {s['parity_max_abs']:.2e} "
        f"({s['parity_max_rel']:.1e} of the largest logit).",
        "",
        "Machine state per sample (fraction of both cores busy just before it, waited seconds, 1-minute load):",
        "",
    ]
    for n, rows in res["samples"].items():
        for e, ss in rows.items():
            st = "; ".join(f"{x['busy_before']:.2f}, {x['waited_s']:.0f} s, {x['loadavg'][0]:.2f}" for x in ss)
            lines.append(f"- {n} threads, {e}: {st}")
    lines += [
        "",
        "Notes. This 2-core machine is shared with other jobs, so each number above is one sample of a "
        "moving target: the [min, best] spread is the noise, and the JSON keeps every pass of every sample. "
        "The busy fraction (from /proc/stat over 1 s while the benchmark is idle) is the gate, not the "
        "1-minute load average, which counts this benchmark's own previous processes (about 1 after a "
        "2-thread sample). The copy bandwidth is torch `copy_` (read + written bytes); decoding only reads "
        "weights, so it can exceed that figure; the read probe (a plain parallel read with the engine's threads "
        "and huge pages) is the stricter ceiling. Both move between samples. "
        "OpenMP runs with libgomp's defaults (no OMP_WAIT_POLICY, no OMP_PROC_BIND): see the README's C "
        "inference section for why (fork/join costs with the passive policy, binding on a shared machine).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
