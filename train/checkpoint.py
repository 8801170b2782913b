"""Checkpoints: atomic writes and verified reads.

File layout: MAGIC (8 bytes) | SHA-256 of the payload (32 bytes) | payload (a torch.save archive).
`save` writes a temp file beside the target, fsyncs it and renames it over the target, so a crash
never leaves a half-written checkpoint where the last good one was. `load` checks magic, length and
hash before unpickling, so a truncated or corrupted file gives a clear error instead of garbage.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

MAGIC = b"HYLACKP1"


class CheckpointError(ValueError):
    pass


def save(obj: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(MAGIC + hashlib.sha256(payload).digest() + payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    data = path.read_bytes()
    if len(data) < len(MAGIC) + 32 or data[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path} is not a hyla checkpoint (bad magic or too short)")
    digest, payload = data[len(MAGIC) : len(MAGIC) + 32], data[len(MAGIC) + 32 :]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path} is corrupt or truncated (checksum mismatch)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
