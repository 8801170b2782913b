"""The hyla hybrid language model (shared/spec/hybrid-95m.md), plain PyTorch around the kernel dispatch.

Blocks are pre-norm, tiled `(gdn, gdn, csa, full)`; each is
    h   = (1 + r_a) x + (1 + s_a) mixer(attention_norm(x))
    out = (1 + r_f) h + (1 + s_f) ffn(ffn_norm(h))
with r, s zero-initialized vectors (hyper-connection scaling). Every GDN and CSA op goes through
`kernels.gdn` / `kernels.csa` / `kernels.conv`, which pick Triton on CUDA and the PyTorch reference elsewhere.

`Hyla.forward(idx, targets)` runs whole sequences (training). `Hyla.forward(idx, cache=cache)` runs the
next tokens of sequences whose past lives in `cache` (from `Hyla.new_cache`): GDN recurrent and conv
state, CSA window + compressed cache, full-attention KV cache. Both give the same logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.ce import linear_cross_entropy
from kernels.common import compute_dtype
from kernels.conv import causal_conv1d_silu
from kernels.csa import CSADecodeState, compress_kv, csa_attention
from kernels.gdn import gated_delta_rule
from kernels.rope import apply_rope, rope_tables
from model.config import HylaConfig

Tensor = torch.Tensor


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    xf = x.to(compute_dtype(x))  # norms compute in fp32 (fp64 when the model runs in fp64)
    return xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """y = norm(x) * (1 + w), w zero-initialized, normalization in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (rms_normalize(x, self.eps) * (1.0 + self.weight)).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """GDN output norm: w * rmsnorm(o) * silu(z) over each head's channels, w ones-initialized, fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: Tensor, z: Tensor) -> Tensor:
        return self.weight * rms_normalize(o, self.eps) * F.silu(z.to(compute_dtype(o)))


# ----------------------------------------------------------------------------- caches


@dataclass
class AttentionCache:
    k: Tensor | None = None  # [B, L, Hkv, D], RoPE'd
    v: Tensor | None = None


@dataclass
class CSACache:
    state: CSADecodeState | None = None  # window ring, unfinished block sums, compressed cache


@dataclass
class GDNCache:
    conv: Tensor | None = None  # last (conv width - 1) pre-conv inputs [B, conv - 1, C]
    state: Tensor | None = None  # recurrent state [B, H, K, V], fp32


@dataclass
class Cache:
    """Per-layer decoding state and the position of the next token."""

    layers: list
    pos: int = 0
    rope: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- mixers


class Attention(nn.Module):
    """Shared projections of the full-attention and CSA layers: gated q, q/k RMSNorm, GQA.

    wq's output per head is 2 * head_dim = [q | gate]; the context is multiplied by sigmoid(gate).
    Query head h reads KV head h // (n_heads / n_kv_heads).
    """

    def __init__(self, cfg: HylaConfig):
        super().__init__()
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, D
        self.scale = D**-0.5
        self.wq = nn.Linear(cfg.dim, H * 2 * D, bias=False)
        self.wk = nn.Linear(cfg.dim, Hkv * D, bias=False)
        self.wv = nn.Linear(cfg.dim, Hkv * D, bias=False)
        self.wo = nn.Linear(H * D, cfg.dim, bias=False)
        self.q_norm = RMSNorm(D, cfg.norm_eps)
        self.k_norm = RMSNorm(D, cfg.norm_eps)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [B, T, dim] -> q, gate [B, T, H, D], k (normed, before RoPE), v [B, T, Hkv, D]."""
        B, T, _ = x.shape
        q, gate = self.wq(x).view(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        return self.q_norm(q), gate, self.k_norm(k), v

    def output(self, ctx: Tensor, gate: Tensor) -> Tensor:
        B, T = ctx.shape[:2]
        return self.wo((ctx * torch.sigmoid(gate)).reshape(B, T, -1))


def attend(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float) -> Tensor:
    """Masked GQA softmax attention for the decoding paths: q [B, T, H, D], k/v [B, L, Hkv, D],
    visible [T, L] bool. Rows with no visible key give 0."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    scores = torch.einsum("btkgd,blkd->bkgtl", q.view(B, T, Hkv, H // Hkv, D), k) * scale
    any_visible = visible.any(-1)
    p = scores.masked_fill(~(visible | ~any_visible[:, None]), float("-inf")).softmax(-1)
    out = torch.einsum("bkgtl,blkd->btkgd", p, v).reshape(B, T, H, D)
    return torch.where(any_visible[None, :, None, None], out, 0.0)


class FullAttention(Attention):
    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: AttentionCache | None = None) -> Tensor:
        q, gate, k, v = self.project(x)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            if cache.k is not None:
                k, v = torch.cat([cache.k, k], 1), torch.cat([cache.v, v], 1)
            cache.k, cache.v = k, v
            T, L = x.shape[1], k.shape[1]
            if L > T:  # new tokens after a cached prefix: causal with an offset
                k_pos = torch.arange(L, device=x.device)
                visible = k_pos[None, :] <= k_pos[L - T :, None]
                return self.output(attend(q, k, v, visible, self.scale), gate)
        ctx = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=self.scale,
            enable_gqa=True,
        )
        return self.output(ctx.transpose(1, 2), gate)


class CSA(Attention):
    """Compressed sparse attention: a stride-`csa_stride` compressed path over finished blocks and a
    `csa_window` sliding-window path, blended per channel by sigmoid(blend_gate(x))."""

    def __init__(self, cfg: HylaConfig):
        super().__init__(cfg)
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.stride, self.window, self.max_seq_len = cfg.csa_stride, cfg.csa_window, cfg.max_seq_len
        self.rotary_dim, self.theta = cfg.rotary_dim, cfg.rope_theta
        self.compress_k = nn.Linear(kv_dim, kv_dim, bias=False)
        self.compress_v = nn.Linear(kv_dim, kv_dim, bias=False)
        self.blend_gate = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)

    def compress(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        w_k, w_v = self.compress_k.weight, self.compress_v.weight
        return compress_kv(k, v, w_k, w_v, self.stride, self.rotary_dim, self.theta)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: CSACache | None = None) -> Tensor:
        q, gate, k_raw, v = self.project(x)
        q, k = apply_rope(q, *rope), apply_rope(k_raw, *rope)
        blend = torch.sigmoid(self.blend_gate(x))
        if cache is None:
            kc, vc = self.compress(k_raw, v)
            ctx = csa_attention(q, k, v, kc, vc, blend, self.window, self.stride, self.scale)
        else:
            ctx = self._forward_cached(q, k, k_raw, v, blend, cache)
        return self.output(ctx, gate)

    def _forward_cached(self, q, k, k_raw, v, blend, cache: CSACache) -> Tensor:
        """A prompt into an empty cache goes through the full-sequence kernel and then fills the decode
        state; later tokens are decoded one at a time against it (`kernels.csa.CSADecodeState`)."""
        B, T, H, D = q.shape
        if cache.state is None:
            kc, vc = self.compress(k_raw, v)
            ctx = csa_attention(q, k, v, kc, vc, blend, self.window, self.stride, self.scale)
            cache.state = CSADecodeState(
                B, self.n_kv_heads, D, self.max_seq_len, self.compress_k.weight, self.compress_v.weight,
                self.window, self.stride, self.rotary_dim, self.theta, self.scale,
                dtype=compute_dtype(q), device=q.device,
            )  # fmt: skip
            cache.state.prefill(k, v, k_raw)
            return ctx
        steps = [cache.state.step(q[:, t], k[:, t], v[:, t], k_raw[:, t], blend[:, t]) for t in range(T)]
        return torch.stack(steps, 1)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet mixer: causal depthwise conv + SiLU on q|k|v, L2-normed q/k, the gated delta rule,
    gated RMSNorm output `w * rmsnorm(o) * silu(z)` per head."""

    def __init__(self, cfg: HylaConfig):
        super().__init__()
        H, Dh = cfg.gdn_heads, cfg.gdn_head_dim
        self.n_heads, self.head_dim = H, Dh
        self.conv_width = cfg.gdn_conv
        C = 3 * H * Dh
        self.in_proj_qkv = nn.Linear(cfg.dim, C, bias=False)
        self.conv1d = nn.Conv1d(C, C, cfg.gdn_conv, groups=C, bias=False)
        self.in_proj_z = nn.Linear(cfg.dim, H * Dh, bias=False)
        self.in_proj_b = nn.Linear(cfg.dim, H, bias=False)
        self.in_proj_a = nn.Linear(cfg.dim, H, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(H))
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        self.norm = GatedRMSNorm(Dh, cfg.norm_eps)
        self.out_proj = nn.Linear(H * Dh, cfg.dim, bias=False)

    def causal_conv_silu(self, x: Tensor, cache: GDNCache | None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v: silu(depthwise causal conv of x) with zero left context, or the cached one, split in
        three (`kernels.conv`, which writes the three parts as separate tensors)."""
        B, T, C = x.shape
        past = None if cache is None or cache.conv is None else cache.conv.to(x.dtype)
        qkv = causal_conv1d_silu(x, self.conv1d.weight[:, 0], past, chunks=3)
        if cache is not None:
            pad = self.conv_width - 1
            cache.conv = torch.cat([x.new_zeros(B, pad, C) if past is None else past, x], 1)[:, -pad:]
        return qkv

    def project_gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """b, a [B, T, H] from one matmul over the stacked in_proj_b, in_proj_a weights, padded with zero
        rows to a multiple of 8 outputs. Alone, each has H = 9 outputs per row, rows that are not 16-byte
        aligned, and cuBLAS falls back to unaligned kernels (2.2 ms per 95m step at B32, forward +
        backward). The parameters stay separate (Muon, checkpoints, export)."""
        w_b, w_a = self.in_proj_b.weight, self.in_proj_a.weight
        pad = w_b.new_zeros(-2 * self.n_heads % 8, w_b.shape[1])
        b, a = F.linear(x, torch.cat([w_b, w_a, pad]))[..., : 2 * self.n_heads].chunk(2, dim=-1)
        return b, a

    def forward(self, x: Tensor, rope=None, cache: GDNCache | None = None) -> Tensor:
        B, T, _ = x.shape
        H, Dh = self.n_heads, self.head_dim
        q, k, v = (t.reshape(B, T, H, Dh) for t in self.causal_conv_silu(self.in_proj_qkv(x), cache))
        b, a = self.project_gates(x)
        beta = torch.sigmoid(b)
        a = a.to(compute_dtype(x))
        g = -self.A_log.exp() * F.softplus(a + self.dt_bias)  # log-space decay, fp32
        o, state = gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            scale=Dh**-0.5,
            initial_state=None if cache is None else cache.state,
            output_final_state=cache is not None,
            use_qk_l2norm=True,
        )
        if cache is not None:
            cache.state = state
        o = self.norm(o, self.in_proj_z(x).view(B, T, H, Dh)).to(x.dtype)
        return self.out_proj(o.reshape(B, T, H * Dh))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: HylaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


MIXERS = {"gdn": GatedDeltaNet, "csa": CSA, "full": FullAttention}
CACHES = {"gdn": GDNCache, "csa": CSACache, "full": AttentionCache}


class Block(nn.Module):
    def __init__(self, cfg: HylaConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mixer = MIXERS[kind](cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.hyper_connections = cfg.hyper_connections
        if cfg.hyper_connections:
            self.attn_residual_scale = nn.Parameter(torch.zeros(cfg.dim))
            self.attn_sublayer_scale = nn.Parameter(torch.zeros(cfg.dim))
            self.ffn_residual_scale = nn.Parameter(torch.zeros(cfg.dim))
            self.ffn_sublayer_scale = nn.Parameter(torch.zeros(cfg.dim))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache=None) -> Tensor:
        f = self.mixer(self.attention_norm(x), rope, cache)
        if self.hyper_connections:  # h = (1 + r) h + (1 + s) f(h)
            h = (1 + self.attn_residual_scale) * x + (1 + self.attn_sublayer_scale) * f
            f = self.ffn(self.ffn_norm(h))
            return (1 + self.ffn_residual_scale) * h + (1 + self.ffn_sublayer_scale) * f
        h = x + f
        return h + self.ffn(self.ffn_norm(h))


class Hyla(nn.Module):
    """The hybrid LM. forward(idx [B, T] int64, targets=None, cache=None) -> logits, or the mean
    cross-entropy loss when targets [B, T] are given (targets equal to -1 are ignored)."""

    def __init__(self, cfg: HylaConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_types)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        cos, sin = rope_tables(torch.arange(cfg.max_seq_len), cfg.rotary_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # derived, never saved in checkpoints
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, std) for linear and embedding weights; w3, wo and out_proj get std / sqrt(2 n_layers);
        norms, scales, A_log, dt_bias and the conv keep their module init."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith(("w3.weight", "wo.weight", "out_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            elif name == "embedding.weight" or (name.endswith(".weight") and p.dim() == 2):
                nn.init.normal_(p, 0.0, std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self) -> Cache:
        return Cache(layers=[CACHES[kind]() for kind in self.cfg.layer_types])

    def check_input(self, idx: Tensor, pos: int = 0) -> None:
        if not isinstance(idx, Tensor) or idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 2:
            got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(f"idx must be an int64/int32 tensor [batch, seq], got {got}")
        T = idx.shape[1]
        if T == 0 or pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {pos + T} must be in [1, {self.cfg.max_seq_len}] (context)")
        lo, hi = torch.aminmax(idx)
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got [{int(lo)}, {int(hi)}]")
        if idx.device != self.embedding.weight.device:
            raise ValueError(f"idx is on {idx.device}, the model on {self.embedding.weight.device}")

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache: Cache | None = None) -> Tensor:
        pos = 0 if cache is None else cache.pos
        if not torch.compiler.is_compiling():
            self.check_input(idx, pos)
        T = idx.shape[1]
        rope = (self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T])
        x = self.embedding(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if targets is None:
            return F.linear(x, self.embedding.weight)  # tied head
        return linear_cross_entropy(x.flatten(0, 1), self.embedding.weight, targets.reshape(-1), ignore_index=-1)
