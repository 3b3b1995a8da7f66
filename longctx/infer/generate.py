"""Generation with the KV cache: chunked prefill (only the last position's logits are computed), then
one token per step."""

from __future__ import annotations

import torch

from longctx.infer.cache import KVCache
from longctx.model import GPT


@torch.no_grad()
def prefill(model: GPT, cache: KVCache, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Run (B, T) prompt ids through the model into `cache` in chunks; return last logits (B, V)."""
    h = None
    for s in range(0, ids.shape[1], chunk):
        h = model.hidden_states(ids[:, s:s + chunk], cache=cache)
    return model.logits(h[:, -1])


@torch.no_grad()
def generate_tokens(model: GPT, prompt_ids: list[int], max_new_tokens: int, *,
                    stop_ids: set[int] | None = None, prefill_chunk: int = 512) -> list[int]:
    """Greedy continuation of one prompt -> the new token ids (stops early at a stop id, kept)."""
    device = model.head_weight.device
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, device=device,
                    dtype=model.head_weight.dtype)
    logits = prefill(model, cache, torch.tensor([prompt_ids], device=device), prefill_chunk)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits.argmax(-1)[0])
        out.append(nxt)
        if stop_ids and nxt in stop_ids:
            break
        logits = model.logits(model.hidden_states(torch.tensor([[nxt]], device=device), cache=cache)[:, -1])
    return out
