"""The two forwards of generation with the KV cache: chunked prefill (only the last position's logits are
computed, so there is no L x V logits tensor and attention never sees more than `chunk` queries at once),
then one token per step. The decoding loop itself is `longctx.infer.engine`.

Rows of a batch may hold prompts of different lengths: they are right-aligned and `cache.pad[b]` leading
slots of row b are padding; the model takes each row's positions (slot - pad) and the key mask of its
padding from the cache (`GPT.context`), so nothing here needs to know.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from longctx.infer import decode_ops, fused_decode
from longctx.infer.cache import KVCache
from longctx.model import GPT


@torch.no_grad()
def forward_hidden(model: GPT, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
    """Append (B, T) ids to the cache (evicting first in streaming mode) -> final hidden states (B, T, d)."""
    decode_ops.install(model)  # once per model: matrix-vector products etc. at memory speed (decode steps)
    cache.reserve(ids.shape[1])
    if ids.shape[1] == 1 and fused_decode.supports(model, cache):
        return fused_decode.step(model, cache, ids)  # every layer in one native call
    return model.hidden_states(ids, cache=cache)


def forward_last(model: GPT, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
    """Append (B, T) ids to the cache -> logits of the last one only (B, V): no T x V logits tensor."""
    last = forward_hidden(model, cache, ids)[:, -1]
    head = getattr(model, "quantized_head", None)  # set by longctx.infer.quant
    # model.logits, through the decode linear (one row per sequence)
    return head(last) if head is not None else decode_ops.head_logits(last, model.head_weight)


@torch.no_grad()
def prefill(
    model: GPT,
    cache: KVCache,
    ids: torch.Tensor,
    chunk: int = 512,
    on_chunk: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run (B, T) prompt ids through the model into `cache` in chunks; return last logits (B, V).
    on_chunk(done, T) after each chunk: a progress bar's hook (a 16K-token prompt is minutes on 2 cores)."""
    if cache.sinks is not None:  # a chunk must fit the streaming window
        chunk = min(chunk, cache.max_len - cache.sinks)
    logits = None
    T = ids.shape[1]
    for s in range(0, T, chunk):
        logits = forward_last(model, cache, ids[:, s : s + chunk])
        if on_chunk is not None:
            on_chunk(min(s + chunk, T), T)
    return logits
