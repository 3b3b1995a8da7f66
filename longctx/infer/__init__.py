"""Inference: an explicit KV cache, sampling and the generation engine."""

from longctx.infer.cache import KVCache

__all__ = ["KVCache"]
