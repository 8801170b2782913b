"""Text -> tokenizer -> token shards + manifest, and the memory-mapped loader that trains on them.

A prepared data directory holds
    tokenizer.model                 SentencePiece model (trained here, or the one given)
    {split}_{i:03d}.bin             token ids, uint16 when the vocab fits, else uint32
    manifest.json                   tokenizer hash and vocab, dtype, per-split shards, tokens, bytes
Each document is encoded as [BOS] ids [EOS] (delimiters per document, not per line).

Batches are a pure function of (seed, step): step s draws `global_batch` random windows of seq_len + 1
tokens, and DDP rank r takes rows [r B, (r + 1) B). So resuming at a step continues the exact stream,
and the ranks of a DDP run together see the same global batch as one process would.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

EMBEDDED_CORPUS = Path(__file__).parent / "corpus" / "shakespeare.jsonl.gz"
MANIFEST_VERSION = 1
SHARD_TOKENS = 1 << 27  # tokens per shard file


# ----------------------------------------------------------------------------- documents


def read_documents(path: str | os.PathLike) -> Iterator[str]:
    """Yield document texts from a file or a directory of files.

    .jsonl / .jsonl.gz and .parquet: one document per row, column `text` (as in HF datasets such as
    FineWeb); .txt: the whole file is one document. Nothing is downloaded.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    readable = [p for p in files if p.name.endswith((".jsonl", ".jsonl.gz", ".parquet", ".txt"))]
    if not readable:
        raise ValueError(f"no .jsonl, .jsonl.gz, .parquet or .txt files under {path}")
    for p in readable:
        if p.name.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise ImportError("reading .parquet needs pyarrow: pip install pyarrow") from e
            for batch in pq.ParquetFile(p).iter_batches(columns=["text"]):
                yield from batch.column("text").to_pylist()
        elif p.name.endswith(".txt"):
            yield p.read_text(encoding="utf-8")
        else:
            opener = gzip.open if p.name.endswith(".gz") else open
            with opener(p, "rt", encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if line.strip():
                        row = json.loads(line)
                        if "text" not in row:
                            raise ValueError(f"{p}:{i + 1}: row has no 'text' field")
                        yield row["text"]


def split_documents(docs: list[str], val_docs: int) -> dict[str, list[str]]:
    """Every k-th document goes to validation, so val samples the whole corpus."""
    if not 0 < val_docs < len(docs):
        raise ValueError(f"val_docs must be in [1, {len(docs) - 1}] for {len(docs)} documents, got {val_docs}")
    k = len(docs) // val_docs
    val_idx = {k * i + k // 2 for i in range(val_docs)}
    return {
        "train": [d for i, d in enumerate(docs) if i not in val_idx],
        "val": [d for i, d in enumerate(docs) if i in val_idx],
    }


# ----------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """A SentencePiece model with BOS/EOS ids and a content hash that identifies it in checkpoints."""

    def __init__(self, model_path: str | os.PathLike):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model {model_path} not found")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.sha256 = hashlib.sha256(model_path.read_bytes()).hexdigest()
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"tokenizer {model_path} has no BOS/EOS pieces")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (control tokens 0, byte pieces 1, '▁' counts as a space)."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            out[i] = 1 if self.sp.is_byte(i) else len(self.sp.id_to_piece(i).replace("▁", " ").encode("utf-8"))
        return out

    def identity(self) -> dict:
        return {"sha256": self.sha256, "vocab_size": self.vocab_size}


def train_tokenizer(docs: list[str], vocab_size: int, out_path: str | os.PathLike) -> Tokenizer:
    """BPE SentencePiece on the documents' lines, Llama 2 layout (unk 0, bos 1, eos 2, byte fallback,
    no normalization, whitespace kept)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lines = (line for d in docs for line in d.splitlines() if line.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=str(out_path.with_suffix("")),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,  # newlines and rare characters become byte pieces: every text round-trips
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return Tokenizer(out_path)


# ----------------------------------------------------------------------------- shards


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare(
    out_dir: str | os.PathLike,
    source: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    vocab_size: int = 4096,
    val_docs: int = 3,
) -> dict:
    """Tokenize documents into shards under out_dir and write manifest.json; returns the manifest.

    source: a file or directory (see read_documents); None takes the embedded corpus.
    tokenizer: a SentencePiece .model to use as is; None trains a BPE model of `vocab_size` on train.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = list(read_documents(source if source is not None else EMBEDDED_CORPUS))
    splits = split_documents(docs, val_docs)
    tok_path = out_dir / "tokenizer.model"
    if tokenizer is None:
        tok = train_tokenizer(splits["train"], vocab_size, tok_path)
    else:
        tok_path.write_bytes(Path(tokenizer).read_bytes())
        tok = Tokenizer(tok_path)
    dtype = token_dtype(tok.vocab_size)
    manifest = {
        "version": MANIFEST_VERSION,
        "source": str(source) if source is not None else f"embedded:{EMBEDDED_CORPUS.name}",
        "tokenizer": {"file": tok_path.name, **tok.identity(), "bos_id": tok.bos_id, "eos_id": tok.eos_id},
        "dtype": dtype.name,
        "splits": {},
    }
    for split, texts in splits.items():
        ids = np.fromiter((i for t in texts for i in tok.encode(t, bos=True, eos=True)), dtype=np.int64).astype(dtype)
        shards = []
        for n, start in enumerate(range(0, len(ids), SHARD_TOKENS)):
            name = f"{split}_{n:03d}.bin"
            ids[start : start + SHARD_TOKENS].tofile(out_dir / name)
            shards.append({"file": name, "tokens": int(min(SHARD_TOKENS, len(ids) - start))})
        manifest["splits"][split] = {
            "documents": len(texts),
            "tokens": int(len(ids)),
            "bytes": sum(len(t.encode("utf-8")) for t in texts),
            "shards": shards,
        }
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out_dir / "manifest.json")
    return manifest


class TokenData:
    """A prepared data directory: the manifest, the tokenizer and memory-mapped token streams."""

    def __init__(self, data_dir: str | os.PathLike):
        self.dir = Path(data_dir)
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `hyla data --out {self.dir}` first")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: manifest version {self.manifest.get('version')}, expected {MANIFEST_VERSION}")
        self.tokenizer = Tokenizer(self.dir / self.manifest["tokenizer"]["file"])
        if self.tokenizer.sha256 != self.manifest["tokenizer"]["sha256"]:
            raise ValueError(f"{self.dir}: tokenizer.model does not match the hash in the manifest")
        self.splits = {s: self._open(s) for s in self.manifest["splits"]}

    def _open(self, split: str) -> np.ndarray:
        info = self.manifest["splits"][split]
        parts = []
        for shard in info["shards"]:
            f = self.dir / shard["file"]
            arr = np.memmap(f, dtype=self.manifest["dtype"], mode="r")
            if len(arr) != shard["tokens"]:
                raise ValueError(f"{f}: {len(arr)} tokens, the manifest says {shard['tokens']}")
            parts.append(arr)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def unigram_bpb(self) -> float:
        """Bits per byte of the val split under the train split's unigram token distribution (add-one
        smoothed): the baseline a language model must beat. Bytes are counted as in evaluation."""
        counts = np.bincount(self.splits["train"], minlength=self.tokenizer.vocab_size).astype(np.float64) + 1.0
        logp = np.log2(counts / counts.sum())
        targets = np.asarray(self.splits["val"][1:])
        return float(-logp[targets].sum() / self.tokenizer.token_bytes[targets].sum())


class BatchSampler:
    """Random windows of seq_len + 1 tokens; the batch of a step depends only on (seed, step, rank)."""

    def __init__(
        self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets [batch_size, seq_len] (int64) for micro-batch `micro` of `step`."""
        gen = np.random.default_rng([self.seed, step, micro])
        starts = gen.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size * self.world_size)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in mine]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


def val_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int | None = None
) -> Iterator[torch.Tensor]:
    """The split in order (or its first max_tokens) as consecutive windows of seq_len + 1 tokens, each
    sharing its last token with the next window's first, so every token but the first is predicted
    exactly once. Yields [<= batch_size, seq_len + 1] int64 batches; a shorter tail window comes alone."""
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    full = (n - 1) // seq_len
    for b in range(0, full, batch_size):
        rows = range(b, min(b + batch_size, full))
        yield torch.from_numpy(
            np.stack([np.asarray(tokens[r * seq_len : r * seq_len + seq_len + 1]) for r in rows]).astype(np.int64)
        )
    if full * seq_len < n - 1:
        yield torch.from_numpy(np.asarray(tokens[full * seq_len : n], dtype=np.int64))[None]
