"""The one switch point for attention: `attention(q, k, v, ..., backend=...)`.

`backend` is a registered name, "auto", or a backend function itself: the model's forward context hands
one over when a wrapper from outside must take every call of that forward (ring attention inside a
context-parallel step, LongLoRA's S²-Attn while extending). There is no global override: what a forward
uses travels with that forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from longctx.attention import cpu_decode, cpu_flash
from longctx.attention.chunked import chunked_attention
from longctx.attention.mask import KeyMask
from longctx.attention.sdpa import sdpa_attention
from longctx.errors import ConfigError

# A backend: fn(q, k, v, *, causal, q_offset, alibi_slopes, key_mask, scale, dropout_p, chunk_size) -> out
#   q: (B, Hq, Tq, hd); k, v: (B, Hkv, Tk, hd), Hq a multiple of Hkv (grouped-query attention).
#   Query row i sits at key index q_offset + i (q_offset = tokens already in a KV cache).
#   key_mask: a `KeyMask` (padded rows) or None.
Backend = Callable[..., torch.Tensor]
BACKENDS: dict[str, Backend] = {
    "sdpa": sdpa_attention,
    "chunked": chunked_attention,
    "cpu_flash": cpu_flash.cpu_flash_attention,
    "cpu_decode": cpu_decode.cpu_decode_attention,
}

# Above this many mask entries, `auto` avoids sdpa's materialised-mask path for a whole-sequence call.
# Measured on CPU (torch 2.13): sdpa runs its flash kernel with or without a mask, fwd+bwd memory O(L) (47
# MiB extra at 4096 tokens x 8 heads, 168 MiB at 16384) -- only the mask itself is O(L^2), (H, Tq, Tk) with
# ALiBi -- and it is faster and lighter than the chunked backend (176 MiB at 4096), so the rule stays:
# chunked only for a big mask. Calls after cached keys (a prefill chunk, a decode step) have at most
# chunk x S mask entries and stay on sdpa, whose single kernel beats the chunked backend's Python loop.
_MASKED_SDPA_LIMIT = 1024 * 1024


def bf16_copies_attention(q, k, v, *, causal=True, q_offset=0, alibi_slopes=None, key_mask=None, scale=None,
                          dropout_p=0.0, chunk_size=256) -> torch.Tensor:  # fmt: skip
    """fp32 q, k, v of an inference call through the bf16 kernels on bf16 copies, the output widened back
    (for a model whose prefill runs bf16 arithmetic: quantized weights on a CPU with native bf16,
    `longctx.infer.quant`); any call those kernels do not take (a decode step, a mask, a gradient, a CPU
    without them) gets what `auto` picks, on q, k, v as they are."""
    how = dict(alibi_slopes=alibi_slopes, dropout_p=dropout_p)
    if (
        q.dtype == torch.float32
        and q.shape[-2] >= cpu_flash.MIN_QUERIES
        and key_mask is None
        and not torch.is_grad_enabled()
        and cpu_flash.bf16_layout_ok(q, k, v, **how)
    ):
        low = [t.bfloat16() for t in (q, k, v)]
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        return cpu_flash.flash_attention_bf16(*low, causal, q_offset, scale)[0].float()  # keeps the layout
    return attention(
        q, k, v, causal=causal, q_offset=q_offset, alibi_slopes=alibi_slopes, key_mask=key_mask,
        dropout_p=dropout_p, chunk_size=chunk_size, scale=scale,
    )  # fmt: skip


def register_backend(name: str, fn: Backend) -> None:
    """Make `fn` selectable by name (`attn_backend` in a config, `backend=` here)."""
    BACKENDS[name] = fn


def needs_mask(q: torch.Tensor, k: torch.Tensor, causal: bool, q_offset: int, alibi: bool) -> bool:
    Tq, Tk = q.shape[-2], k.shape[-2]
    if alibi:
        return True
    return causal and Tq > 1 and not (q_offset == 0 and Tq == Tk)


def auto_backend(q, k, v, *, causal, q_offset, alibi_slopes, key_mask, dropout_p) -> str:
    """What `auto` runs for this call."""
    Tq = q.shape[-2]
    if Tq == 1 and q_offset == k.shape[-2] - 1 and dropout_p == 0.0 and cpu_decode.supports(q, k, v):
        if key_mask is None or key_mask.starts is not None:
            return "cpu_decode"  # a decode step streamed at memory bandwidth, 16-bit caches read as stored
    if Tq >= cpu_flash.MIN_QUERIES and key_mask is None:
        # fp32 on CPU: the native FlashAttention kernels (~20% faster than torch's fwd+bwd, and a query
        # offset needs no mask tensor); `supports` says when they take the call, `supports_upcast` when
        # they take half-precision inference on fp32 copies (a CPU that would emulate it), `supports_bf16`
        # bf16 inference on bf16 dot products (AVX512-BF16)
        how = dict(alibi_slopes=alibi_slopes, dropout_p=dropout_p)
        if any(
            ok(q, k, v, **how)
            for ok in (cpu_flash.supports, cpu_flash.supports_bf16, cpu_flash.supports_upcast)
        ):
            return "cpu_flash"
    masked = key_mask is not None or needs_mask(q, k, causal, q_offset, alibi_slopes is not None)
    heads = q.shape[1] if alibi_slopes is not None else 1  # an ALiBi bias is per head
    rows = q.shape[0] if key_mask is not None else 1  # a key mask is per row
    big = rows * heads * Tq * k.shape[-2] > _MASKED_SDPA_LIMIT
    return "chunked" if masked and big and q_offset == 0 and dropout_p == 0.0 else "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    q_offset: int = 0,
    alibi_slopes: torch.Tensor | None = None,
    key_mask: KeyMask | None = None,
    backend: str | Backend = "auto",
    dropout_p: float = 0.0,
    chunk_size: int = 256,
    scale: float | None = None,
) -> torch.Tensor:
    """(B, Hq, Tq, hd) x (B, Hkv, Tk, hd) -> (B, Hq, Tq, hd)."""
    if backend == "auto":
        backend = auto_backend(
            q, k, v, causal=causal, q_offset=q_offset, alibi_slopes=alibi_slopes, key_mask=key_mask,
            dropout_p=dropout_p,
        )  # fmt: skip
    if not callable(backend):
        if backend not in BACKENDS:
            raise ConfigError(f"unknown attention backend {backend!r}; registered: {', '.join(BACKENDS)}")
        backend = BACKENDS[backend]
    return backend(
        q,
        k,
        v,
        causal=causal,
        q_offset=q_offset,
        alibi_slopes=alibi_slopes,
        key_mask=key_mask,
        scale=scale,
        dropout_p=dropout_p,
        chunk_size=chunk_size,
    )


register_backend("cpu_flash_bf16", bf16_copies_attention)
