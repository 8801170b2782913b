"""Export a checkpoint to the binary files the C engine (csrc/) reads: `model.bin` and `tokenizer.bin`.

model.bin (little-endian, format version 1):
    header   512 bytes   `HEADER` below: magic, version, every config field the engine needs, layer
                         kinds, tensor count, data CRC32, file size, header CRC32
    table    n x 128 B   `ENTRY`: name (state_dict key), dtype, shape, offset, size
    data                 tensors at 64-byte aligned offsets (mmap-able), zero padding between them
dtypes: 0 = fp32; 1 = int8 group-quantized: q + 128 as uint8 [rows, cols] (offset binary: the unsigned
operand of the C engine's VNNI dot products), zero padding to 64 bytes, then fp32
scales [rows, ceil(cols / 64)], w = q * scale per group of 64 consecutive input dims (the last group of
a row may be shorter; symmetric, scale = max|w| / 127). `--quant int8` stores every 2-D weight whose
cols are a multiple of 16 (the tied embedding included) as int8; vectors, norms and the conv stay fp32.
The header CRC covers header (its CRC field zeroed) and table, the data CRC every byte after the
table: a flipped bit anywhere fails the load. The exporter writes exactly the tensors `expected_tensors`
lists for the config, and the C loader derives the same list from the header, so no weight can be
dropped silently.

tokenizer.bin (a SentencePiece BPE model, what the engine's encoder needs):
    magic "HYLATOK1", u32 version, u32 vocab, u32 bos, eos, unk, u32 flags (bit 0 add_dummy_prefix,
    bit 1 remove_extra_whitespaces, bit 2 byte_fallback), u32 max piece bytes, u32 CRC32 of the rest;
    then per piece: f32 score, u8 type (SentencePiece's: 1 normal, 2 unknown, 3 control,
    4 user-defined, 5 unused, 6 byte), u16 length, UTF-8 bytes.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from model.config import HylaConfig

MAGIC = b"HYLAMODL"
VERSION = 1
HEADER_BYTES = 512
ENTRY_BYTES = 128
ALIGN = 64
MAX_LAYERS = 256
QUANT_GROUP = 64
Q8_MULTIPLE = 16  # int8 rows must be a multiple of the C kernels' 16-lane width
DTYPE_F32, DTYPE_Q8 = 0, 1
LAYER_CODES = {"gdn": 0, "csa": 1, "full": 2}

HEADER = np.dtype(
    [
        ("magic", "S8"), ("version", "<u4"), ("header_bytes", "<u4"), ("n_tensors", "<u4"),
        ("quant_group", "<u4"), ("file_bytes", "<u8"), ("data_crc", "<u4"), ("header_crc", "<u4"),
        ("vocab_size", "<i4"), ("dim", "<i4"), ("n_layers", "<i4"), ("max_seq_len", "<i4"),
        ("n_heads", "<i4"), ("n_kv_heads", "<i4"), ("head_dim", "<i4"), ("rotary_dim", "<i4"),
        ("csa_stride", "<i4"), ("csa_window", "<i4"), ("gdn_heads", "<i4"), ("gdn_head_dim", "<i4"),
        ("gdn_conv", "<i4"), ("ffn_hidden", "<i4"), ("hyper_connections", "<i4"), ("reserved", "<i4"),
        ("norm_eps", "<f8"), ("rope_theta", "<f8"), ("rope_fraction", "<f8"),
        ("layer_types", "u1", (MAX_LAYERS,)),
    ]
)  # fmt: skip
ENTRY = np.dtype(
    [("name", "S80"), ("dtype", "<u4"), ("ndim", "<u4"), ("shape", "<u4", (4,)), ("offset", "<u8"),
     ("nbytes", "<u8"), ("reserved", "<u4"), ("pad", "<u4")]
)  # fmt: skip
assert HEADER.itemsize <= HEADER_BYTES and ENTRY.itemsize == ENTRY_BYTES


def expected_tensors(cfg: HylaConfig) -> dict[str, tuple[int, ...]]:
    """Every state_dict tensor the config implies, with its shape (the C loader builds the same list)."""
    d, H, Hkv, D = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    Hg, Dg = cfg.gdn_heads, cfg.gdn_head_dim
    out: dict[str, tuple[int, ...]] = {"embedding.weight": (cfg.vocab_size, d)}
    for i, kind in enumerate(cfg.layer_types):
        p = f"layers.{i}."
        out[p + "attention_norm.weight"] = (d,)
        m = p + "mixer."
        if kind == "gdn":
            out |= {
                m + "in_proj_qkv.weight": (3 * Hg * Dg, d), m + "conv1d.weight": (3 * Hg * Dg, 1, cfg.gdn_conv),
                m + "in_proj_z.weight": (Hg * Dg, d), m + "in_proj_b.weight": (Hg, d),
                m + "in_proj_a.weight": (Hg, d), m + "dt_bias": (Hg,), m + "A_log": (Hg,),
                m + "norm.weight": (Dg,), m + "out_proj.weight": (d, Hg * Dg),
            }  # fmt: skip
        else:
            out |= {
                m + "wq.weight": (2 * H * D, d), m + "wk.weight": (Hkv * D, d), m + "wv.weight": (Hkv * D, d),
                m + "wo.weight": (d, H * D), m + "q_norm.weight": (D,), m + "k_norm.weight": (D,),
            }  # fmt: skip
            if kind == "csa":
                out |= {
                    m + "compress_k.weight": (Hkv * D, Hkv * D), m + "compress_v.weight": (Hkv * D, Hkv * D),
                    m + "blend_gate.weight": (H * D, d),
                }  # fmt: skip
        out[p + "ffn_norm.weight"] = (d,)
        out |= {p + "ffn.w1.weight": (cfg.ffn_hidden, d), p + "ffn.w3.weight": (cfg.ffn_hidden, d)}
        out[p + "ffn.w2.weight"] = (d, cfg.ffn_hidden)
        if cfg.hyper_connections:
            for s in ("attn_residual_scale", "attn_sublayer_scale", "ffn_residual_scale", "ffn_sublayer_scale"):
                out[p + s] = (d,)
    out["norm.weight"] = (d,)
    return out


def quantize_q8(w: np.ndarray, group: int = QUANT_GROUP) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per group of `group` input dims (the last group may be shorter):
    w [rows, cols] -> q int8 [rows, cols], scales [rows, ceil(cols / group)]."""
    rows, cols = w.shape
    ng = -(-cols // group)
    g = np.pad(w.astype(np.float32), ((0, 0), (0, ng * group - cols))).reshape(rows, ng, group)
    scale = np.abs(g).max(-1) / 127.0
    q = np.rint(g / np.where(scale == 0, 1.0, scale)[..., None]).clip(-127, 127).astype(np.int8)
    return q.reshape(rows, ng * group)[:, :cols].copy(), scale.astype(np.float32)


def dequantize_q8(q: np.ndarray, scale: np.ndarray, group: int = QUANT_GROUP) -> np.ndarray:
    return q.astype(np.float32) * np.repeat(scale, group, axis=1)[:, : q.shape[1]]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _blobs(state: dict[str, torch.Tensor], cfg: HylaConfig, quant: str) -> list[tuple[str, int, tuple, list]]:
    """(name, dtype, shape, [byte chunks]) per tensor in the `expected_tensors` order, after checking the
    state dict holds exactly those tensors with those shapes."""
    want = expected_tensors(cfg)
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise ValueError(f"state dict does not match the config: missing {missing}, unexpected {extra}")
    out = []
    for name, shape in want.items():
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)}, the config implies {shape}")
        w = t.numpy()
        if quant == "int8" and w.ndim == 2 and shape[1] % Q8_MULTIPLE == 0:
            q, scale = quantize_q8(w)
            pad = bytes(_align(q.nbytes) - q.nbytes)
            stored = (q.astype(np.int16) + 128).astype(np.uint8)
            out.append((name, DTYPE_Q8, shape, [stored.tobytes(), pad, scale.tobytes()]))
        else:
            out.append((name, DTYPE_F32, shape, [w.astype("<f4").tobytes()]))
    return out


def export_model(state: dict[str, torch.Tensor], cfg: HylaConfig, out: str | os.PathLike, quant: str = "fp32") -> int:
    """Write model.bin for `state` (a Hyla state_dict) and `cfg`; returns the file size in bytes."""
    if quant not in ("fp32", "int8"):
        raise ValueError(f"quant must be 'fp32' or 'int8', got {quant!r}")
    if cfg.n_layers > MAX_LAYERS:
        raise ValueError(f"at most {MAX_LAYERS} layers, got {cfg.n_layers}")
    blobs = _blobs(state, cfg, quant)
    table = np.zeros(len(blobs), ENTRY)
    offset = _align(HEADER_BYTES + len(blobs) * ENTRY_BYTES)
    data_start = offset
    for e, (name, dtype, shape, chunks) in zip(table, blobs, strict=True):
        nbytes = sum(len(c) for c in chunks)
        e["name"], e["dtype"], e["ndim"] = name.encode(), dtype, len(shape)
        e["shape"][: len(shape)] = shape
        e["offset"], e["nbytes"] = offset, nbytes
        offset = _align(offset + nbytes)
    # the data region, padding included, in write order: its CRC is taken on the fly
    pieces = []
    pos = data_start
    for e, (_, _, _, chunks) in zip(table, blobs, strict=True):
        pieces.append(bytes(int(e["offset"]) - pos))
        pieces.extend(chunks)
        pos = int(e["offset"] + e["nbytes"])
    pieces.append(bytes(offset - pos))
    data_crc = 0
    for p in pieces:
        data_crc = zlib.crc32(p, data_crc)

    h = np.zeros((), HEADER)
    h["magic"], h["version"], h["header_bytes"], h["n_tensors"] = MAGIC, VERSION, HEADER_BYTES, len(blobs)
    h["quant_group"] = QUANT_GROUP
    h["file_bytes"], h["data_crc"] = offset, data_crc
    for f in ("vocab_size", "dim", "n_layers", "max_seq_len", "n_heads", "n_kv_heads", "head_dim", "rotary_dim",
              "csa_stride", "csa_window", "gdn_heads", "gdn_head_dim", "gdn_conv", "ffn_hidden",
              "norm_eps", "rope_theta", "rope_fraction"):  # fmt: skip
        h[f] = getattr(cfg, f)
    h["hyper_connections"] = int(cfg.hyper_connections)
    h["layer_types"][: cfg.n_layers] = [LAYER_CODES[k] for k in cfg.layer_types]
    head = bytearray(h.tobytes().ljust(HEADER_BYTES, b"\0") + table.tobytes())
    head += bytes(data_start - len(head))
    crc_at = HEADER.fields["header_crc"][1]
    head[crc_at : crc_at + 4] = struct.pack("<I", zlib.crc32(head))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(head)
        for p in pieces:
            fh.write(p)
    os.replace(tmp, out)
    return offset


# ----------------------------------------------------------------------------- tokenizer

TOK_MAGIC = b"HYLATOK1"
TOK_VERSION = 1


def _proto_fields(buf: bytes) -> dict[int, list]:
    """Minimal protobuf wire-format reader: field number -> values (varints as int, others as bytes)."""
    out: dict[int, list] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            v = varint()
        elif wire == 1:
            v, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n = varint()
            v, i = buf[i : i + n], i + n
        elif wire == 5:
            v, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(field, []).append(v)
    return out


def export_tokenizer(model_path: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write tokenizer.bin from a SentencePiece BPE .model (pieces, scores, types, normalizer flags)."""
    proto = _proto_fields(Path(model_path).read_bytes())
    trainer = _proto_fields(proto.get(2, [b""])[0])
    normalizer = _proto_fields(proto.get(3, [b""])[0])
    model_type = trainer.get(3, [1])[-1]  # 1 unigram (the proto default), 2 bpe
    if model_type != 2:
        raise ValueError(f"{model_path}: only SentencePiece BPE models are supported (model_type {model_type})")
    flag = lambda msg, field, default: bool(msg.get(field, [default])[-1])
    if flag(trainer, 24, False):
        raise ValueError(f"{model_path}: treat_whitespace_as_suffix is not supported by the C encoder")
    if normalizer.get(2, [b""])[0]:  # precompiled_charsmap: rules such as NFKC, which the C side lacks
        raise ValueError(f"{model_path}: only the identity normalization is supported by the C encoder")
    pieces = []
    for raw in proto.get(1, []):
        p = _proto_fields(raw)
        text = p.get(1, [b""])[0]
        score = struct.unpack("<f", p[2][0])[0] if 2 in p else 0.0
        pieces.append((text, score, p.get(3, [1])[-1]))
    if any(kind == 4 for _, _, kind in pieces):
        raise ValueError(f"{model_path}: user-defined pieces are not supported by the C encoder")
    ids = {kind: i for i, (_, _, kind) in reversed(list(enumerate(pieces)))}
    text_ids = {t: i for i, (t, _, _) in enumerate(pieces)}
    bos, eos = text_ids.get(b"<s>", -1), text_ids.get(b"</s>", -1)
    if bos < 0 or eos < 0 or 2 not in ids:
        raise ValueError(f"{model_path}: needs <unk>, <s> and </s> pieces")
    flags = flag(normalizer, 3, True) | flag(normalizer, 4, True) << 1 | flag(trainer, 35, False) << 2
    body = b"".join(struct.pack("<fBH", s, k, len(t)) + t for t, s, k in pieces)
    fields = struct.pack("<7I", len(pieces), bos, eos, ids[2], flags, max(len(t) for t, _, _ in pieces), 0)
    head = TOK_MAGIC + struct.pack("<I", TOK_VERSION) + fields
    crc = zlib.crc32(head[:-4] + body)
    Path(out).write_bytes(head[:-4] + struct.pack("<I", crc) + body)


def export_checkpoint(ckpt_path: str, out: str, quant: str = "fp32", tokenizer_out: str | None = None) -> dict:
    """`hyla export`: model.bin from a training checkpoint, and tokenizer.bin beside it (or at
    tokenizer_out) from the checkpoint's verified tokenizer. Returns what was written."""
    from train.cli import load_model

    model, tok = load_model(ckpt_path)
    size = export_model(model.state_dict(), model.cfg, out, quant)
    tok_out = Path(tokenizer_out) if tokenizer_out else Path(out).with_name("tokenizer.bin")
    export_tokenizer(tok.path, tok_out)
    return {"model": str(out), "bytes": size, "quant": quant, "tokenizer": str(tok_out)}
