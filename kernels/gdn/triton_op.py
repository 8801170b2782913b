"""The Triton gated delta rule as a differentiable op: an autograd Function for eager mode and the same
launchers registered as torch.library custom ops (`hyla::gdn_chunk_fwd`, `hyla::gdn_chunk_bwd`, with fake
implementations and an autograd formula), so that torch.compile(fullgraph=True) traces through it.
"""

from __future__ import annotations

import torch

from kernels.common import carve, fast_apply
from kernels.gdn.triton_bwd import chunk_bwd
from kernels.gdn.triton_fwd import chunk_fwd, saved_parts

Tensor = torch.Tensor
# bf16 and fp32 (exact "ieee" products, slow to compile) q/k/v; both checked on an H100 with Triton 3.6.
# fp32 through tf32x3 products stopped there with an illegal memory access, hence "ieee".
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why the Triton path does not take these inputs, or None when it does."""
    if not (q.dtype == k.dtype == v.dtype and q.dtype in SUPPORTED_DTYPES):
        return f"q, k, v of one dtype in {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}"
    return None


class GatedDeltaRuleFunction(torch.autograd.Function):
    """Eager-mode autograd wrapper of the forward (`chunk_fwd`) and backward (`chunk_bwd`) launchers: saves the
    inputs and the forward's workspace; with `l2norm` (the kernels normalize q and k) the output too."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, l2norm):
        save = any(ctx.needs_input_grad)
        o, ht, ws = chunk_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, save, l2norm)
        if save:
            ctx.save_for_backward(q, k, v, g, beta, ws, o if l2norm else None)
        ctx.scale, ctx.l2norm = scale, l2norm
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, ws, o = ctx.saved_tensors
        dq, dk, dv, dg, dbeta, dh0 = chunk_bwd(q, k, v, g, beta, ctx.scale, ws, o, do, dht, ctx.h0_dtype is not None,
                                               ctx.l2norm)  # fmt: skip
        return dq, dk, dv, dg, dbeta, None, (dh0.to(ctx.h0_dtype) if dh0 is not None else None), None, None


_APPLY = fast_apply(GatedDeltaRuleFunction)


@torch.library.custom_op("hyla::gdn_chunk_fwd", mutates_args=())
def _fwd_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    initial_state: Tensor | None, output_final_state: bool, l2norm: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    o, ht, ws = chunk_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, True, l2norm)
    return o, (ht if ht is not None else q.new_empty(0, dtype=torch.float32)), ws


@_fwd_op.register_fake
def _(q, k, v, g, beta, scale, initial_state, output_final_state, l2norm):
    B, T, H, K = q.shape
    V = v.shape[-1]
    ht = q.new_empty(B, H, K, V, dtype=torch.float32) if output_final_state else q.new_empty(0, dtype=torch.float32)
    size, _ = carve(saved_parts(B, T, H, K, V, q.dtype, l2norm, True))  # (saved_layout's cache: symbolic sizes)
    return torch.empty_like(v), ht, q.new_empty(size, dtype=torch.uint8)


@torch.library.custom_op("hyla::gdn_chunk_bwd", mutates_args=())
def _bwd_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, ws: Tensor, o: Tensor, do: Tensor,
    dht: Tensor | None, scale: float, has_h0: bool, l2norm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    dq, dk, dv, dg, dbeta, dh0 = chunk_bwd(q, k, v, g, beta, scale, ws, o, do, dht, has_h0, l2norm)
    return dq, dk, dv, dg, dbeta, (dh0 if has_h0 else q.new_empty(0, dtype=torch.float32))


@_bwd_op.register_fake
def _(q, k, v, g, beta, ws, o, do, dht, scale, has_h0, l2norm):
    B, _, H, K = q.shape
    dh0 = q.new_empty(B, H, K, v.shape[-1], dtype=torch.float32) if has_h0 else q.new_empty(0, dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), dh0)  # fmt: skip


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, scale, initial_state, _, l2norm = inputs
    o = output[0] if l2norm else q.new_empty(0)  # (9) in the backward takes <dO, O> for dq
    ctx.save_for_backward(q, k, v, g, beta, output[2], o)
    ctx.mark_non_differentiable(output[2])
    ctx.scale, ctx.l2norm = scale, l2norm
    ctx.h0_dtype = initial_state.dtype if initial_state is not None else None


def _backward(ctx, do, dht, _):
    has_dht = dht is not None and dht.numel() > 0
    dq, dk, dv, dg, dbeta, dh0 = torch.ops.hyla.gdn_chunk_bwd(
        *ctx.saved_tensors, do, dht if has_dht else None, ctx.scale, ctx.h0_dtype is not None, ctx.l2norm
    )
    dh0 = dh0.to(ctx.h0_dtype) if ctx.h0_dtype is not None else None
    return dq, dk, dv, dg, dbeta, None, dh0, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def triton_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(o, final state or None) by the Triton kernels; inputs as `kernels.gdn.gated_delta_rule` takes them,
    validated there, with `unsupported_reason` None; `use_qk_l2norm` normalizes q and k inside the kernels
    (as `kernels.gdn.l2norm` does). Non-contiguous inputs are copied."""
    q, k, v, g, beta = q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous()
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    if torch.compiler.is_compiling():
        o, ht, _ = torch.ops.hyla.gdn_chunk_fwd(
            q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm
        )
        return o, (ht if output_final_state else None)
    return _APPLY(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm)
