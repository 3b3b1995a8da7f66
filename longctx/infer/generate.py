"""The two forwards of generation with the KV cache: chunked prefill (only the last position's logits are
computed, so there is no L x V logits tensor and attention never sees more than `chunk` queries at once),
then one token per step. The decoding loop itself is `longctx.infer.engine`.

Rows of a batch may hold prompts of different lengths: they are right-aligned, `cache.pad[b]` leading
slots of row b are padding, positions come from `cache.key_positions` (slot - pad) and the attention
(`cached_attention`) masks the pad keys.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from longctx.attention import register_backend, use_backend
from longctx.attention.sdpa import attention_bias, sdpa_attention
from longctx.infer import decode_ops, native
from longctx.infer.cache import KVCache
from longctx.model import GPT

_PAD: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("longctx_pad", default=None)


def cached_attention(
    q, k, v, *, causal=True, q_offset=0, alibi_slopes=None, scale=None, dropout_p=0.0, chunk_size=256
) -> torch.Tensor:
    """Attention for calls with a KV cache: queries are one prefill chunk or one decode step, so the bias
    of a masked call is at most chunk x S — sdpa with it beats the chunked backend's Python loop, which
    `auto` would pick for long caches. With padded rows (`_PAD` set) the leading pad keys of each row are
    masked too.

    q: (B, Hq, Tq, hd), k/v: (B, Hkv, Tk, hd); query i sits at slot q_offset + i. A pad query may see only
    itself: a row of all -inf would give NaN, and NaN values poison real queries through p @ v even at
    probability 0."""
    pad = _PAD.get()
    if q.shape[-2] == 1 and q_offset == k.shape[-2] - 1 and dropout_p == 0.0 and native.attention_ok(q, k, v):
        # a decode step: every key is visible but the leading pad ones; streamed at memory bandwidth, and
        # 16-bit cached keys/values are read as they are stored
        return native.decode_attention(q, k, v, scale=scale, starts=pad, alibi_slopes=alibi_slopes)
    if k.dtype != q.dtype:  # a 16-bit cache read where the native kernel cannot serve it
        k, v = k.to(q.dtype), v.to(q.dtype)
    kw = dict(causal=causal, q_offset=q_offset, alibi_slopes=alibi_slopes, scale=scale, dropout_p=dropout_p)
    if pad is None:
        return sdpa_attention(q, k, v, **kw)
    B, Tq, Tk = q.shape[0], q.shape[-2], k.shape[-2]
    bias = attention_bias(
        Tq, Tk, causal=causal, q_offset=q_offset, alibi_slopes=alibi_slopes, device=q.device, dtype=q.dtype
    )  # (H|1, Tq, Tk) or None
    kj = torch.arange(Tk, device=q.device)
    qi = torch.arange(Tq, device=q.device) + q_offset
    visible = (kj[None, None] >= pad[:, None, None]) | (kj[None, None] == qi[None, :, None])  # (B, Tq, Tk)
    mask = torch.zeros(B, 1, Tq, Tk, device=q.device, dtype=q.dtype).masked_fill(
        ~visible[:, None], float("-inf")
    )
    if bias is not None:
        mask = mask + bias[None]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


register_backend("cached", cached_attention)


@contextlib.contextmanager
def _cached_attention(cache: KVCache):
    token = _PAD.set(cache.pad)
    try:
        with use_backend("cached"):
            yield
    finally:
        _PAD.reset(token)


@torch.no_grad()
def forward_hidden(model: GPT, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
    """Append (B, T) ids to the cache (evicting first in streaming mode) -> final hidden states (B, T, d)."""
    T = ids.shape[1]
    decode_ops.install(model)  # once per model: matrix-vector products etc. at memory speed (decode steps)
    cache.reserve(T)
    positions = None
    if cache.pad is not None:
        start = cache.length
        positions = cache.key_positions(start + T)[:, start:]  # (B, T): slot - pad
    with _cached_attention(cache):
        return model.hidden_states(ids, positions, cache=cache)


def forward_last(model: GPT, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
    """Append (B, T) ids to the cache -> logits of the last one only (B, V): no T x V logits tensor."""
    # model.logits, through the decode linear (one row per sequence)
    return decode_ops.linear(forward_hidden(model, cache, ids)[:, -1], model.head_weight)


@torch.no_grad()
def prefill(model: GPT, cache: KVCache, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Run (B, T) prompt ids through the model into `cache` in chunks; return last logits (B, V)."""
    if cache.sinks is not None:  # a chunk must fit the streaming window
        chunk = min(chunk, cache.max_len - cache.sinks)
    logits = None
    for s in range(0, ids.shape[1], chunk):
        logits = forward_last(model, cache, ids[:, s : s + chunk])
    return logits


def generate_tokens(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    stop_ids: set[int] | None = None,
    prefill_chunk: int = 512,
) -> list[int]:
    """Greedy continuation of one prompt -> the new token ids (stops early at a stop id, kept)."""
    from longctx.infer.engine import Engine, SamplingParams  # the engine imports this module

    if max_new_tokens <= 0:
        return []
    params = SamplingParams(max_tokens=max_new_tokens, stop_ids=set(stop_ids or ()))
    return (
        Engine(model, prefill_chunk=prefill_chunk, stop_at_eos=False).generate(prompt_ids, params).token_ids
    )
