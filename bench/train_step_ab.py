"""A/B of pieces of the 95m training step at batch 32 x 1024, on one GPU, in one run: the model as it
is (Triton causal conv + SiLU from `kernels.conv` writing q, k, v as three tensors, chunked linear
cross-entropy from `kernels/ce`) against the forms they replaced (grouped `F.conv1d` + SiLU on the
transposed layout; the same Triton conv with one output split into q, k, v views, which the GDN op copies
and whose gradients are concatenated; the full [B T, vocab] logits and `F.cross_entropy`), eager and
under torch.compile.

    PYTHONPATH=. python3 bench/train_step_ab.py --out profiles/train_step_ab.json [--variants current conv_one_output]

Step = `bench.train_step.make_step` (bf16 autocast forward + backward, grad clip, Muon + AdamW); median of 8
CUDA-event-timed steps after 3 warm-up steps; peak = torch.cuda.max_memory_allocated over warm-up and timing.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import model.model as model_module
from bench.conv import cudnn_conv_silu
from bench.train_step import make_step, median, timed
from kernels.conv import causal_conv1d_silu
from model import get_config

CURRENT = (model_module.GatedDeltaNet.causal_conv_silu, model_module.linear_cross_entropy)


def grouped_conv1d_silu(self, x, cache):
    """The replaced form (`bench.conv.cudnn_conv_silu`) in place of the model's method."""
    return cudnn_conv_silu(x, self.conv1d.weight[:, 0]).chunk(3, -1)


def conv_one_output(self, x, cache):
    """The Triton conv with one [B, T, 3 C'] output, split into q, k, v views (session 5's model)."""
    return causal_conv1d_silu(x, self.conv1d.weight[:, 0]).chunk(3, -1)


def full_logits_cross_entropy(x, weight, targets, ignore_index=-1):
    return F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index)


VARIANTS = {
    "plain": (grouped_conv1d_silu, full_logits_cross_entropy),
    "chunked_loss": (grouped_conv1d_silu, CURRENT[1]),
    "triton_conv": (CURRENT[0], full_logits_cross_entropy),
    "conv_one_output": (conv_one_output, CURRENT[1]),
    "current": CURRENT,
}


def bench(variant: str, compile_: bool, batch: int, reps: int) -> dict:
    model_module.GatedDeltaNet.causal_conv_silu, model_module.linear_cross_entropy = VARIANTS[variant]
    step = make_step(batch, get_config("95m").max_seq_len, compile_)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ms = median(timed(step, 3, reps))
    return {"variant": variant, "compile": compile_, "ms": ms, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="profiles/train_step_ab.json")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None, help="compiled only, these")
    args = ap.parse_args()
    runs = [(False, "plain"), (False, "current")] + [(True, v) for v in VARIANTS]
    if args.variants:
        runs = [(True, v) for v in args.variants]
    rows = []
    for compile_, variant in runs:
        rows.append(bench(variant, compile_, args.batch, args.reps))
        print(json.dumps(rows[-1]), flush=True)
    model_module.GatedDeltaNet.causal_conv_silu, model_module.linear_cross_entropy = CURRENT
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
