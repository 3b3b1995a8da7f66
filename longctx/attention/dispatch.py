"""The one switch point for attention."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from longctx.attention import cpu_flash
from longctx.attention.chunked import chunked_attention
from longctx.attention.sdpa import sdpa_attention
from longctx.errors import ConfigError

# A backend: fn(q, k, v, *, causal, q_offset, alibi_slopes, scale, dropout_p, chunk_size) -> out
#   q: (B, Hq, Tq, hd); k, v: (B, Hkv, Tk, hd), Hq a multiple of Hkv (grouped-query attention).
#   Query row i sits at key index q_offset + i (q_offset = tokens already in a KV cache).
Backend = Callable[..., torch.Tensor]
BACKENDS: dict[str, Backend] = {
    "sdpa": sdpa_attention,
    "chunked": chunked_attention,
    "cpu_flash": cpu_flash.cpu_flash_attention,
}
_override: list[str] = []

# Above this many mask entries, `auto` avoids sdpa's materialised-mask path. Measured on CPU (torch 2.13):
# sdpa runs its flash kernel with or without a mask, fwd+bwd memory O(L) (47 MiB extra at 4096 tokens x 8
# heads, 168 MiB at 16384) -- only the mask itself is O(L^2), (H, Tq, Tk) with ALiBi -- and it is faster
# and lighter than the chunked backend (176 MiB at 4096), so the rule stays: chunked only for a big mask.
_MASKED_SDPA_LIMIT = 1024 * 1024


def register_backend(name: str, fn: Backend) -> None:
    BACKENDS[name] = fn


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run everything inside with backend `name`, whatever the config says (e.g. ring attention)."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; registered: {', '.join(BACKENDS)}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def needs_mask(q: torch.Tensor, k: torch.Tensor, causal: bool, q_offset: int, alibi: bool) -> bool:
    Tq, Tk = q.shape[-2], k.shape[-2]
    if alibi:
        return True
    return causal and Tq > 1 and not (q_offset == 0 and Tq == Tk)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    q_offset: int = 0,
    alibi_slopes: torch.Tensor | None = None,
    backend: str = "auto",
    dropout_p: float = 0.0,
    chunk_size: int = 256,
    scale: float | None = None,
) -> torch.Tensor:
    """(B, Hq, Tq, hd) x (B, Hkv, Tk, hd) -> (B, Hq, Tq, hd)."""
    if _override:
        backend = _override[-1]
    if backend == "auto" and q.shape[-2] >= cpu_flash.MIN_QUERIES:
        # fp32 on CPU: the native FlashAttention kernels (~20% faster than torch's fwd+bwd, and a query
        # offset needs no mask tensor); `supports` says when they take the call
        if cpu_flash.supports(q, k, v, alibi_slopes=alibi_slopes, dropout_p=dropout_p):
            backend = "cpu_flash"
    if backend == "auto":
        masked = needs_mask(q, k, causal, q_offset, alibi_slopes is not None)
        heads = q.shape[1] if alibi_slopes is not None else 1  # an ALiBi bias is per head
        big = heads * q.shape[-2] * k.shape[-2] > _MASKED_SDPA_LIMIT
        backend = "chunked" if masked and big and dropout_p == 0.0 else "sdpa"
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; registered: {', '.join(BACKENDS)}")
    return BACKENDS[backend](
        q,
        k,
        v,
        causal=causal,
        q_offset=q_offset,
        alibi_slopes=alibi_slopes,
        scale=scale,
        dropout_p=dropout_p,
        chunk_size=chunk_size,
    )
