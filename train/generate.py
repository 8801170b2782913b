"""Sampling from a trained model with the incremental decoding caches (prefill, then one token a step)."""

from __future__ import annotations

import torch

from model import Hyla


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Next ids [B] from logits [B, V]: greedy at temperature 0, else nucleus sampling (top_p)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest prefix with mass >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


@torch.no_grad()
def generate(
    model: Hyla,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int | None = None,
    stop_id: int | None = None,
) -> torch.Tensor:
    """Continue prompt [B, T] by up to max_new_tokens (bounded by the context); returns the new ids."""
    gen = None if seed is None else torch.Generator(prompt.device).manual_seed(seed)
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - prompt.shape[1])
    cache = model.new_cache()
    logits = model(prompt, cache=cache)[:, -1]
    out = []
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, gen)
        out.append(nxt)
        if stop_id is not None and bool((nxt == stop_id).all()) or len(out) == max_new_tokens:
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return torch.stack(out, 1) if out else prompt.new_zeros(prompt.shape[0], 0)
