"""The Triton gated delta rule as a differentiable op: an autograd Function for eager mode and the same
launchers registered as torch.library custom ops (`hyla::gdn_chunk_fwd`, `hyla::gdn_chunk_bwd`, with fake
implementations and an autograd formula), so that torch.compile(fullgraph=True) traces through it.
"""

from __future__ import annotations

import torch

from kernels.common import cdiv
from kernels.gdn.triton_bwd import chunk_bwd
from kernels.gdn.triton_fwd import BT, chunk_fwd

Tensor = torch.Tensor
# bf16 and fp32 (exact "ieee" products, slow to compile) q/k/v; both checked on an H100 with Triton 3.6.
# fp32 through tf32x3 products stopped there with an illegal memory access, hence "ieee".
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why the Triton path does not take these inputs, or None when it does."""
    if not (q.dtype == k.dtype == v.dtype and q.dtype in SUPPORTED_DTYPES):
        return f"q, k, v of one dtype in {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}"
    return None


def _grads(saved: tuple[Tensor, ...], scale: float, has_h0: bool, l2norm: bool, do: Tensor, dht: Tensor | None):
    q, k, v, g, beta, h0, G, Tinv, Pm, Wk, hs, W, Rn, o = saved
    dht = dht.contiguous() if dht is not None else None  # the gradient of S_T.sum() is a stride-0 expand
    dq, dk, dv, dg, dbeta, dh0 = chunk_bwd(q, k, v, g, beta, scale, G, Tinv, Pm, Wk, hs, W, Rn, o,
                                           do.contiguous(), dht, has_h0, l2norm)  # fmt: skip
    return dq, dk, dv, dg, dbeta, (dh0.to(h0.dtype) if has_h0 else None)


class GatedDeltaRuleFunction(torch.autograd.Function):
    """Eager-mode autograd wrapper of the forward (`chunk_fwd`) and backward (`chunk_bwd`) launchers; with
    `l2norm` the raw q and k and the output are saved (the kernels normalize q and k)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, l2norm):
        save = any(ctx.needs_input_grad)
        outs = chunk_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, save, l2norm)
        o, ht, G, Tinv, Pm, Wk, hs, W, Rn = outs
        if save:
            ctx.save_for_backward(q, k, v, g, beta, initial_state, G, Tinv, Pm, Wk, hs, W, Rn, o if l2norm else None)
        ctx.scale, ctx.has_h0, ctx.l2norm = scale, initial_state is not None, l2norm
        return o, (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        grads = _grads(ctx.saved_tensors, ctx.scale, ctx.has_h0, ctx.l2norm, do, dht)
        return (*grads[:5], None, grads[5], None, None)


@torch.library.custom_op("hyla::gdn_chunk_fwd", mutates_args=())
def _fwd_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    initial_state: Tensor | None, output_final_state: bool, l2norm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    outs = chunk_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, True, l2norm)
    return outs if l2norm else (*outs[:-1], q.new_empty(0, dtype=torch.float32))  # never the placeholder


@_fwd_op.register_fake
def _(q, k, v, g, beta, scale, initial_state, output_final_state, l2norm):
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = cdiv(T, BT)
    f32 = torch.float32
    ht = q.new_empty(B, H, K, V, dtype=f32) if output_final_state else q.new_empty(0, dtype=f32)
    Rn = q.new_empty(B * H, 2, NT * BT, dtype=f32) if l2norm else q.new_empty(0, dtype=f32)
    return (
        torch.empty_like(v), ht,
        q.new_empty(B * H, NT * BT, dtype=f32), q.new_empty(B * H, NT, BT, BT),
        q.new_empty(B * H, NT, BT, BT), q.new_empty(B * H, NT * BT, K),
        q.new_empty(B * H, NT, K, V), q.new_empty(B * H, NT * BT, V), Rn,
    )  # fmt: skip


@torch.library.custom_op("hyla::gdn_chunk_bwd", mutates_args=())
def _bwd_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, h0: Tensor, G: Tensor, Tinv: Tensor, Pm: Tensor,
    Wk: Tensor, hs: Tensor, W: Tensor, Rn: Tensor, o: Tensor, do: Tensor, dht: Tensor | None, scale: float,
    has_h0: bool, l2norm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    saved = (q, k, v, g, beta, h0, G, Tinv, Pm, Wk, hs, W, Rn, o)
    dq, dk, dv, dg, dbeta, dh0 = _grads(saved, scale, has_h0, l2norm, do, dht)
    return dq, dk, dv, dg, dbeta, (dh0 if has_h0 else h0.new_empty(0))


@_bwd_op.register_fake
def _(q, k, v, g, beta, h0, G, Tinv, Pm, Wk, hs, W, Rn, o, do, dht, scale, has_h0, l2norm):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), torch.empty_like(h0) if has_h0 else h0.new_empty(0))  # fmt: skip


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, scale, initial_state, _, l2norm = inputs
    h0 = initial_state if initial_state is not None else q.new_empty(0)
    o = output[0] if l2norm else q.new_empty(0)  # (9) in the backward takes <dO, O> for dq
    ctx.save_for_backward(q, k, v, g, beta, h0, *output[2:], o)
    ctx.mark_non_differentiable(*output[2:])
    ctx.scale, ctx.has_h0, ctx.l2norm = scale, initial_state is not None, l2norm


def _backward(ctx, do, dht, *_):
    has_dht = dht is not None and dht.numel() > 0
    dq, dk, dv, dg, dbeta, dh0 = torch.ops.hyla.gdn_chunk_bwd(
        *ctx.saved_tensors, do, dht if has_dht else None, ctx.scale, ctx.has_h0, ctx.l2norm
    )
    return dq, dk, dv, dg, dbeta, None, (dh0 if ctx.has_h0 else None), None, None


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
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    if torch.compiler.is_compiling():
        o, ht, *_ = torch.ops.hyla.gdn_chunk_fwd(
            q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm
        )
        return o, (ht if output_final_state else None)
    return GatedDeltaRuleFunction.apply(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm)
