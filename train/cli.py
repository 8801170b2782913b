"""`hyla` command line: data, train, generate, export."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from train.trainer import PRESET_ARGS, TrainArgs


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (the embedded corpus unless --data is given)")
    for f in dataclasses.fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=None, metavar=f.name.upper())
    p.set_defaults(func=cmd_train)


def resolve_train_args(ns: argparse.Namespace) -> TrainArgs:
    """Preset recipe, then the flags given on the command line."""
    preset = ns.preset or TrainArgs.preset
    if preset not in PRESET_ARGS:
        raise SystemExit(f"hyla train: unknown preset {preset!r}; choose from {sorted(PRESET_ARGS)}")
    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs) if getattr(ns, f.name) is not None}
    base = {"out": f"runs/{preset}", **PRESET_ARGS[preset]}
    return TrainArgs(**{**base, **given, "preset": preset})


def cmd_train(ns: argparse.Namespace) -> int:
    from train.trainer import TrainingDiverged, train

    try:
        _, metrics = train(resolve_train_args(ns))
    except TrainingDiverged as e:
        print(f"\nhyla train: {e}", file=sys.stderr)
        return 1
    if "val_bpb" in metrics:
        print(f"\ndone: step {metrics['step']}, val_loss {metrics['val_loss']:.4f}, val_bpb {metrics['val_bpb']:.4f}")
    return 0


def cmd_data(ns: argparse.Namespace) -> int:
    from train.data import prepare

    m = prepare(ns.out, ns.input, ns.tokenizer, ns.vocab_size, ns.val_docs)
    for split, info in m["splits"].items():
        print(f"{split}: {info['documents']} documents, {info['tokens']:,} tokens, {info['bytes']:,} bytes")
    print(f"tokenizer vocab {m['tokenizer']['vocab_size']} sha256 {m['tokenizer']['sha256'][:16]}, dtype {m['dtype']}")
    return 0


def load_model(ckpt_path: str, device: str = "cpu"):
    """(model, tokenizer) from a training checkpoint whose run directory holds data/tokenizer.model."""
    from pathlib import Path

    from model import Hyla, HylaConfig
    from train import checkpoint
    from train.data import Tokenizer

    ckpt = checkpoint.load(ckpt_path)
    model = Hyla(HylaConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    data_dir = ckpt["train_args"]["data"]
    candidates = [Path(ckpt_path).parent / "data" / "tokenizer.model"]
    if data_dir:
        candidates.insert(0, Path(data_dir) / "tokenizer.model")
    tok_path = next((c for c in candidates if c.is_file()), None)
    if tok_path is None:
        raise FileNotFoundError(f"no tokenizer.model found for {ckpt_path} (looked in {[str(c) for c in candidates]})")
    tok = Tokenizer(tok_path)
    if tok.identity() != ckpt["tokenizer"]:
        raise ValueError(f"{tok_path} is not the tokenizer {ckpt_path} was trained with")
    return model.to(device).eval(), tok


def cmd_generate(ns: argparse.Namespace) -> int:
    from train.generate import generate

    device = (
        "cuda" if ns.device == "auto" and torch.cuda.is_available() else ("cpu" if ns.device == "auto" else ns.device)
    )
    model, tok = load_model(ns.ckpt, device)
    prompt = torch.tensor([tok.encode(ns.prompt, bos=True)], device=device)
    new = generate(model, prompt, ns.max_new_tokens, ns.temperature, ns.top_p, ns.seed, stop_id=tok.eos_id)
    print(ns.prompt + tok.decode(new[0].tolist()))
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from train.export import export_checkpoint

    info = export_checkpoint(ns.ckpt, ns.out, ns.quant, ns.tokenizer_out)
    print(f"wrote {info['model']} ({info['quant']}, {info['bytes']:,} bytes) and {info['tokenizer']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hyla", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="tokenize text into shards + manifest")
    d.add_argument("--input", default=None, help="file or directory (.jsonl[.gz], .parquet, .txt); default: embedded")
    d.add_argument("--out", required=True)
    d.add_argument("--tokenizer", default=None, help="SentencePiece .model to use; default: train BPE")
    d.add_argument("--vocab-size", type=int, default=4096)
    d.add_argument("--val-docs", type=int, default=3)
    d.set_defaults(func=cmd_data)
    _train_parser(sub)
    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("--ckpt", required=True)
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_generate)
    e = sub.add_parser("export", help="write model.bin (+ tokenizer.bin) for the C engine (csrc/)")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--out", required=True, help="model file, e.g. model.bin")
    e.add_argument("--quant", choices=["fp32", "int8"], default="fp32")
    e.add_argument("--tokenizer-out", default=None, help="default: tokenizer.bin beside --out")
    e.set_defaults(func=cmd_export)
    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
