"""Model configuration and presets. `95m` is the specified model (shared/spec/hybrid-95m.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

LAYER_KINDS = ("gdn", "csa", "full")


@dataclass(frozen=True)
class HylaConfig:
    vocab_size: int = 32000
    dim: int = 576
    n_layers: int = 16
    layer_pattern: tuple[str, ...] = ("gdn", "gdn", "csa", "full")  # tiled over the layers
    max_seq_len: int = 1024
    norm_eps: float = 1e-6
    init_std: float = 0.02
    hyper_connections: bool = True  # h = (1 + r) h + (1 + s) f(h), r and s zero-initialized
    # attention (full and CSA)
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 20000.0
    rope_fraction: float = 0.5  # RoPE on the first rope_fraction * head_dim dims of each head
    csa_stride: int = 4
    csa_window: int = 64
    # gated delta net
    gdn_heads: int = 9
    gdn_head_dim: int = 112
    gdn_conv: int = 4
    # feed-forward
    ffn_hidden: int = 1536

    def __post_init__(self) -> None:
        bad = [k for k in self.layer_pattern if k not in LAYER_KINDS]
        if bad:
            raise ValueError(f"unknown layer kinds {bad}; choose from {LAYER_KINDS}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rope_fraction * head_dim must be an even number of dims, got {self.rotary_dim}")

    @property
    def layer_types(self) -> tuple[str, ...]:
        p = self.layer_pattern
        return tuple(p[i % len(p)] for i in range(self.n_layers))

    @property
    def rotary_dim(self) -> int:
        return int(round(self.head_dim * self.rope_fraction))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HylaConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        d = dict(d)
        if "layer_pattern" in d:
            d["layer_pattern"] = tuple(d["layer_pattern"])
        return cls(**d)


PRESETS: dict[str, HylaConfig] = {
    "95m": HylaConfig(),
    # Same layer pattern and head dim (64) at a size that trains on 2 CPU cores in minutes.
    "tiny": HylaConfig(
        vocab_size=2048,
        dim=128,
        n_layers=4,
        max_seq_len=256,
        n_heads=2,
        n_kv_heads=1,
        gdn_heads=2,
        gdn_head_dim=64,
        ffn_hidden=384,
    ),
}


def get_config(name: str, **overrides) -> HylaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
