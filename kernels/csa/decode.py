"""Token-by-token CSA decoding: `CSADecodeState`, the per-layer cache for generation.

Each step computes, for the new token at position t, exactly what `csa_attention` computes at row t
(equations (1)-(3) in `reference.py`):

    local : softmax over the ring of the last `window` keys/values (slots hold positions t - window + 1 .. t;
            the order in the ring does not matter to a softmax)
    comp  : softmax over the compressed blocks j < t // stride (finished before t); 0 while there are none
    out   = local + blend * (comp - local)

After the step, if t closes a block of `stride` tokens, that block is compressed as in `compress_kv`
(mean of the `stride` k_raw / v rows, a linear map over the flattened KV heads, RoPE on keys at
position stride j + stride // 2) and appended to the compressed cache. In PyTorch: one token costs
O((window + t / stride) H D), tiny next to the layer's projections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.csa.reference import compress_kv
from kernels.rope import apply_rope, rope_tables

Tensor = torch.Tensor


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q [B, Hkv, G, D] against k, v [B, N, Hkv, D] (all N visible) -> [B, Hkv, G, D]."""
    p = (torch.einsum("bkgd,bnkd->bkgn", q, k) * scale).softmax(-1)
    return torch.einsum("bkgn,bnkd->bkgd", p, v)


class CSADecodeState:
    """Incremental state of one CSA layer for batch decoding, one token at a time.

    Holds the ring of the last `window` keys (normed, RoPE'd) and raw values [B, window, Hkv, D], the
    running sums of k_raw and v over the unfinished compression block [B, Hkv * D], and the compressed
    cache kc, vc [B, ceil(max_len / stride), Hkv, D] (filled up to `pos // stride` blocks). Computed in
    fp32 (fp64 for fp64 inputs); outputs in q's dtype.

    Wiring in a model's CSA layer (per token t = state.pos, x_t the layer's normed input):
        q, k_raw, v  = projections of x_t with q_norm / k_norm applied     # [B, H, D], [B, Hkv, D] x 2
        q, k         = RoPE(q, t), RoPE(k_raw, t)
        blend        = sigmoid(blend_gate(x_t))                            # [B, H * D]
        ctx          = state.step(q, k, v, k_raw, blend)                   # [B, H, D]: row t of csa_attention
    then ctx * sigmoid(gate) and wo as in the full layer. For a prompt, run the full layer (csa_attention
    over all T tokens) and hand its keys to `state.prefill(k, v, k_raw)`; decoding continues at t = T.

    Example:
        >>> B, H, Hkv, D = 1, 9, 3, 64
        >>> wk, wv = torch.randn(Hkv * D, Hkv * D) / 14, torch.randn(Hkv * D, Hkv * D) / 14
        >>> state = CSADecodeState(B, Hkv, D, max_len=16, weight_k=wk, weight_v=wv)
        >>> q, blend = torch.randn(B, H, D), torch.rand(B, H * D)
        >>> k, v, k_raw = (torch.randn(B, Hkv, D) for _ in range(3))
        >>> state.step(q, k, v, k_raw, blend).shape
        torch.Size([1, 9, 64])
    """

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        weight_k: Tensor,
        weight_v: Tensor,
        window: int = 64,
        stride: int = 4,
        rotary_dim: int = 32,
        theta: float = 20000.0,
        scale: float | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        """Empty state for `max_len` tokens; weight_k / weight_v [Hkv * D, Hkv * D] are the compressor's
        (compress_k / compress_v) weights, used as given (no copy)."""
        kv = n_kv_heads * head_dim
        if weight_k.shape != (kv, kv) or weight_v.shape != (kv, kv):
            raise ValueError(
                f"compress weights must be [{kv}, {kv}], got {tuple(weight_k.shape)}, {tuple(weight_v.shape)}"
            )
        if min(batch, n_kv_heads, head_dim, max_len, window, stride) <= 0:
            raise ValueError("batch, n_kv_heads, head_dim, max_len, window and stride must be positive")
        device = weight_k.device if device is None else device
        self.weight_k, self.weight_v = weight_k, weight_v
        self.window, self.stride, self.rotary_dim, self.theta = window, stride, rotary_dim, theta
        self.scale = head_dim**-0.5 if scale is None else scale
        self.max_len, self.pos = max_len, 0
        zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)
        self.k_win, self.v_win = (
            zeros(batch, window, n_kv_heads, head_dim),
            zeros(batch, window, n_kv_heads, head_dim),
        )
        self.sum_k, self.sum_v = zeros(batch, kv), zeros(batch, kv)
        n_blocks = -(-max_len // stride)
        self.kc, self.vc = (
            zeros(batch, n_blocks, n_kv_heads, head_dim),
            zeros(batch, n_blocks, n_kv_heads, head_dim),
        )
        # RoPE tables of every block's position stride j + stride // 2, made once (no host copy per block)
        positions = torch.arange(n_blocks) * stride + stride // 2
        table_dtype = torch.promote_types(weight_k.dtype, torch.float32)  # as compress_kv: fp32, fp64 for fp64
        self.cos, self.sin = (t.to(device) for t in rope_tables(positions, rotary_dim, theta, table_dtype))

    def step(self, q: Tensor, k: Tensor, v: Tensor, k_raw: Tensor, blend: Tensor) -> Tensor:
        """Attend the token at position `self.pos` and advance by one.

        Args:
            q: [B, H, D] query (normed, RoPE'd at pos).
            k, v: [B, Hkv, D] key (normed, RoPE'd) and raw value of the token.
            k_raw: [B, Hkv, D] key after k_norm, before RoPE (the compressor's input).
            blend: [B, H * D] sigmoid(blend_gate(x)) of the token.

        Returns:
            [B, H, D] in q's dtype: row `pos` of `csa_attention` over the whole sequence so far.
        """
        B, W, Hkv, D = self.k_win.shape
        if q.dim() != 3 or q.shape[0] != B or q.shape[2] != D or q.shape[1] % Hkv:
            raise ValueError(f"q must be [{B}, H, {D}] with H a multiple of {Hkv}, got {tuple(q.shape)}")
        H = q.shape[1]
        for name, x, shape in (
            ("k", k, (B, Hkv, D)),
            ("v", v, (B, Hkv, D)),
            ("k_raw", k_raw, (B, Hkv, D)),
            ("blend", blend, (B, H * D)),
        ):
            if tuple(x.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if self.pos >= self.max_len:
            raise ValueError(f"state is full: max_len = {self.max_len} tokens")
        t, dt = self.pos, self.k_win.dtype
        self.k_win[:, t % W], self.v_win[:, t % W] = k, v
        self.sum_k += k_raw.reshape(B, Hkv * D)
        self.sum_v += v.reshape(B, Hkv * D)

        qg = q.to(dt).view(B, Hkv, H // Hkv, D)
        n_win, n_comp = min(t + 1, W), t // self.stride
        local = _attend(qg, self.k_win[:, :n_win], self.v_win[:, :n_win], self.scale)
        comp = _attend(qg, self.kc[:, :n_comp], self.vc[:, :n_comp], self.scale) if n_comp else torch.zeros_like(local)
        out = torch.lerp(local, comp, blend.to(dt).view(B, Hkv, H // Hkv, D)).reshape(B, H, D)

        if (t + 1) % self.stride == 0:
            self._close_block(t // self.stride)
        self.pos += 1
        return out.to(q.dtype)

    def prefill(self, k: Tensor, v: Tensor, k_raw: Tensor) -> None:
        """Load a prompt's T tokens (k, v, k_raw [B, T, Hkv, D], as for `step`) into an empty state."""
        B, W, Hkv, D = self.k_win.shape
        T = k.shape[1]
        for name, x in (("k", k), ("v", v), ("k_raw", k_raw)):
            if tuple(x.shape) != (B, T, Hkv, D):
                raise ValueError(f"{name} must have shape {(B, T, Hkv, D)}, got {tuple(x.shape)}")
        if self.pos != 0 or T > self.max_len:
            raise ValueError(f"prefill needs an empty state and T <= max_len ({self.max_len}); pos={self.pos}, T={T}")
        first = max(T - W, 0)
        slots = torch.arange(first, T, device=self.k_win.device) % W
        self.k_win[:, slots], self.v_win[:, slots] = (
            k[:, first:].to(self.k_win.dtype),
            v[:, first:].to(self.k_win.dtype),
        )
        n = T // self.stride  # finished blocks
        if n:
            kc, vc = compress_kv(
                k_raw[:, : n * self.stride],
                v[:, : n * self.stride],
                self.weight_k,
                self.weight_v,
                self.stride,
                self.rotary_dim,
                self.theta,
            )
            self.kc[:, :n], self.vc[:, :n] = kc, vc
        self.sum_k.copy_(k_raw[:, n * self.stride :].sum(1).reshape(B, Hkv * D))
        self.sum_v.copy_(v[:, n * self.stride :].sum(1).reshape(B, Hkv * D))
        self.pos = T

    def _close_block(self, j: int) -> None:
        """Compress block j from the running sums as compress_kv does (mean, linear, RoPE at 4j + 2)."""
        B, n_blocks, Hkv, D = self.kc.shape
        w_dtype = self.weight_k.dtype
        kc = F.linear((self.sum_k / self.stride).to(w_dtype), self.weight_k).view(B, 1, Hkv, D)
        vc = F.linear((self.sum_v / self.stride).to(w_dtype), self.weight_v).view(B, 1, Hkv, D)
        self.kc[:, j], self.vc[:, j] = apply_rope(kc, self.cos[j : j + 1], self.sin[j : j + 1])[:, 0], vc[:, 0]
        self.sum_k.zero_()
        self.sum_v.zero_()
