"""The training loop: data, Muon + AdamW, schedule, bf16 autocast on GPU, grad accumulation, DDP,
evaluation in bits per byte, atomic checkpoints with exact resume, JSONL log and a progress line."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nvtx
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model import Hyla, HylaConfig, get_config
from train import checkpoint
from train.data import BatchSampler, TokenData, prepare, val_batches
from train.optim import build_optimizers, lr_multiplier, set_lr

CKPT_NAME = "ckpt.pt"


@dataclass
class TrainArgs:
    preset: str = "tiny"
    data: str | None = None  # a prepared data dir (manifest.json), or raw text to prepare; None: embedded
    tokenizer: str | None = None  # a SentencePiece .model for raw data; None trains one of vocab_size
    out: str = "runs/tiny"
    steps: int = 400
    batch_size: int = 16  # sequences per micro-batch per rank
    seq_len: int = 256
    grad_accum: int = 1
    muon_lr: float = 0.02
    adamw_lr: float = 0.002
    weight_decay: float = 0.01
    warmup: int = 40
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 65536  # val tokens per evaluation (the first ones of the split); 0: all
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    resume: bool = False
    stop_after: int | None = None  # end this invocation after this step (checkpointed), e.g. for job limits
    progress: bool = True


# Recipes per preset; `hyla train` flags override them. 95m: the original recipe (shared/spec),
# 64 x 1024 x 32 = 2,097,152 tokens per step on one GPU (fewer accumulation steps per rank under DDP).
PRESET_ARGS = {
    "tiny": dict(steps=400, batch_size=16, seq_len=256, warmup=40, eval_every=100, ckpt_every=100, eval_tokens=32768),
    "95m": dict(
        steps=10_000, batch_size=64, seq_len=1024, grad_accum=32, warmup=500, eval_every=250,
        ckpt_every=250, eval_tokens=1 << 20, out="runs/95m", compile=True,
    ),
}  # fmt: skip


class TrainingDiverged(RuntimeError):
    pass


# ----------------------------------------------------------------------------- setup


def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initializes the process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device(device_arg)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def load_data(args: TrainArgs, vocab_size: int, is_main: bool) -> TokenData:
    """A prepared directory as is; raw text or the embedded corpus is prepared once under out/data."""
    if args.data is not None and (Path(args.data) / "manifest.json").is_file():
        return TokenData(args.data)
    data_dir = Path(args.out) / "data"
    if not (data_dir / "manifest.json").is_file() and is_main:
        print(f"preparing {args.data or 'the embedded corpus'} -> {data_dir}", flush=True)
        prepare(data_dir, args.data, args.tokenizer, vocab_size=vocab_size)
    if dist.is_initialized():
        dist.barrier()
    return TokenData(data_dir)


def model_flops_per_token(cfg: HylaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul params incl. the head) + attention score/value products."""
    with torch.device("meta"):
        model_params = sum(p.numel() for p in Hyla(cfg).parameters() if p.dim() >= 2)
    attn = 0.0
    H, D = cfg.n_heads, cfg.head_dim
    for kind in cfg.layer_types:
        if kind == "full":
            keys = seq_len / 2  # causal: average keys per query
        elif kind == "csa":
            keys = min(cfg.csa_window, seq_len) + seq_len / (2 * cfg.csa_stride)
        else:  # gdn: state update + readout, about 4 K V per head per token, plus the chunk-local products
            keys = 2 * cfg.gdn_head_dim + 64
            H, D = cfg.gdn_heads, cfg.gdn_head_dim
        attn += 2 * 2 * H * D * keys  # QK^T and PV, 2 FLOPs per MAC
        H, D = cfg.n_heads, cfg.head_dim
    return 6 * model_params + 3 * attn


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "B300": 2250.0, "A100": 312.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: Hyla, data: TokenData, seq_len: int, max_tokens: int, device: torch.device, batch_size: int = 16
) -> dict:
    """Mean loss (nats/token) and bits per byte over the first max_tokens of val (0: all of it).
    Bits per byte = total NLL / ln 2 / UTF-8 bytes of the predicted tokens (tokenizer-independent)."""
    token_bytes = torch.from_numpy(data.tokenizer.token_bytes).to(device)
    model.eval()
    nll, tokens, nbytes = 0.0, 0, 0
    for batch in val_batches(data.splits["val"], seq_len, batch_size, max_tokens or None):
        batch = batch.to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.reshape(-1), reduction="none")
        nll += losses.sum().item()
        tokens += y.numel()
        nbytes += token_bytes[y].sum().item()
    model.train()
    return {"val_loss": nll / tokens, "val_bpb": nll / math.log(2) / nbytes, "val_tokens": tokens}


# ----------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(path: Path, model: Hyla, optimizers, data: TokenData) -> int:
    """Load a checkpoint into model and optimizers after checking it belongs to this run; returns step."""
    ckpt = checkpoint.load(path)
    now = model.cfg.to_dict()
    if ckpt["config"] != now:
        diff = {k: (v, now.get(k)) for k, v in ckpt["config"].items() if now.get(k) != v}
        raise checkpoint.CheckpointError(f"{path} was trained with another model config (ckpt, now): {diff}")
    if ckpt["tokenizer"] != data.tokenizer.identity():
        raise checkpoint.CheckpointError(f"{path} was trained with another tokenizer: {ckpt['tokenizer']}")
    model.load_state_dict(ckpt["model"])
    for opt, state in zip(optimizers, ckpt["optimizers"], strict=True):
        hyper = [{k: g[k] for k in ("base_lr", "weight_decay")} for g in opt.param_groups]
        opt.load_state_dict(state)
        for g, h in zip(opt.param_groups, hyper, strict=True):
            g.update(h)  # this invocation's learning rates and decay apply, e.g. lower ones after a divergence
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"]


def save_checkpoint(path: Path, step: int, model: Hyla, optimizers, data: TokenData, args: TrainArgs, metrics):
    checkpoint.save(
        {
            "step": step,  # the data position too: batches are a function of (seed, step)
            "model": model.state_dict(),
            "optimizers": [opt.state_dict() for opt in optimizers],
            "config": model.cfg.to_dict(),
            "tokenizer": data.tokenizer.identity(),
            "train_args": dataclasses.asdict(args),
            "rng": rng_state(),
            "metrics": metrics,
        },
        path,
    )


# ----------------------------------------------------------------------------- loop


class Progress:
    """One self-overwriting status line on a terminal, plain lines otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.tty = total, enabled, sys.stdout.isatty()

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        done = int(30 * step / self.total)
        line = f"[{'#' * done}{'.' * (30 - done)}] {step}/{self.total} {text}"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + text, flush=True)


def train(args: TrainArgs) -> tuple[Hyla, dict]:
    """Train (or resume) a model; returns it with the last metrics. Writes out/ckpt.pt, out/log.jsonl."""
    rank, world, device = setup_distributed(args.device)
    is_main = rank == 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    base_cfg = get_config(args.preset)
    data = load_data(args, base_cfg.vocab_size, is_main)
    cfg = dataclasses.replace(base_cfg, vocab_size=data.tokenizer.vocab_size)
    if args.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {args.seq_len} exceeds the model context {cfg.max_seq_len}")

    model = Hyla(cfg).to(device)
    optimizers = build_optimizers(model, args.muon_lr, args.adamw_lr, args.weight_decay)
    ckpt_path = out / CKPT_NAME
    start = restore(ckpt_path, model, optimizers, data) if args.resume else 0
    ddp = DistributedDataParallel(model) if world > 1 else model
    fwd = torch.compile(ddp) if args.compile else ddp
    sampler = BatchSampler(data.splits["train"], args.seq_len, args.batch_size, args.seed, rank, world)

    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * world
    flops_per_step = model_flops_per_token(cfg, args.seq_len) * tokens_per_step
    peak = peak_flops(device)
    log = open(out / "log.jsonl", "a") if is_main else None
    progress = Progress(args.steps, args.progress and is_main)
    if is_main:
        progress.message(
            f"hyla {args.preset}: {model.num_params():,} params on {device} x{world}, "
            f"{tokens_per_step:,} tokens/step, unigram baseline {data.unigram_bpb():.3f} bpb"
        )
    metrics: dict = {"step": start}
    t_last = time.perf_counter()
    for step in range(start, args.steps):
        set_lr(optimizers, lr_multiplier(step, args.warmup, args.steps))
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            x, y = (t.to(device, non_blocking=True) for t in sampler.batch(step, micro))
            last = micro == args.grad_accum - 1
            ctx = ddp.no_sync() if world > 1 and not last else contextlib.nullcontext()  # all-reduce once
            with ctx, nvtx.annotate("forward_backward"):
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    loss = fwd(x, y) / args.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        if world > 1:
            dist.all_reduce(loss_sum)  # gloo has no AVG
            loss_sum /= world
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"loss is {loss_value} at step {step}; stopping. The last good checkpoint is {ckpt_path} "
                f"(resume with --resume, perhaps with lower learning rates)"
            )
        with nvtx.annotate("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            now = time.perf_counter()
            dt = (now - t_last) / (args.log_every if done % args.log_every == 0 else done % args.log_every)
            t_last = now
            metrics = {
                "step": done,
                "loss": loss_value,
                "lr_mult": lr_multiplier(step, args.warmup, args.steps),
                "grad_norm": grad_norm.item(),
                "tok_s": tokens_per_step / dt,
            }
            if peak:
                metrics["mfu"] = flops_per_step / dt / (peak * world)
            text = f"loss {loss_value:.4f} lr x{metrics['lr_mult']:.3f} {metrics['tok_s']:,.0f} tok/s"
            progress.update(done, text + (f" mfu {metrics['mfu']:.1%}" if peak else ""))
        if done % args.eval_every == 0 or done == args.steps:
            t_eval = time.perf_counter()
            ev = evaluate(model, data, args.seq_len, args.eval_tokens, device)
            metrics.update(ev, step=done)
            progress.message(f"step {done}: val_loss {ev['val_loss']:.4f}  val_bpb {ev['val_bpb']:.4f}")
            t_last += time.perf_counter() - t_eval  # evaluation time is not training throughput
        if log and (done % args.log_every == 0 or done % args.eval_every == 0 or done == args.steps):
            log.write(json.dumps(metrics) + "\n")
            log.flush()
        stop = done == args.steps or done == args.stop_after
        if is_main and (done % args.ckpt_every == 0 or stop):
            save_checkpoint(ckpt_path, done, model, optimizers, data, args, metrics)
        if stop:
            break
    if log:
        log.close()
    if dist.is_initialized():
        dist.barrier()
    return model, metrics
