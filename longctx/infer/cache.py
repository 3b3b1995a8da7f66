"""A small explicit KV cache (gpt-fast style): preallocated per layer, filled by position.

The model calls `update(layer_idx, k, v)` in each layer and then advances `length` once per forward.
With `rotate_on_read` the cache holds keys *before* RoPE and the model rotates all of them with the
frequencies of the current call — needed when the rotation depends on the total length (dynamic NTK/YaRN),
otherwise cached keys keep a stale base (transformers issue #25104).
"""

from __future__ import annotations

import torch

from longctx.config import GPTConfig
from longctx.errors import ConfigError


class KVCache:
    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, *, device=None,
                 dtype: torch.dtype = torch.float32, rotate_on_read: bool | None = None):
        from longctx.positions import build_positions

        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # tokens stored (the model advances it after each forward)
        if rotate_on_read is None:
            rotate_on_read = config.position == "rope" and build_positions(config).length_dependent
        self.rotate_on_read = rotate_on_read

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: (B, K, T, hd) for the new tokens -> all keys/values so far (B, K, S, hd)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ConfigError(f"KV cache is full: {end} tokens > its {self.max_len} slots; "
                              "allocate a longer cache (max_len)")
        self.k[layer_idx, :, :, start:end] = k
        self.v[layer_idx, :, :, start:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def key_positions(self, total: int) -> torch.Tensor:
        """Positions of the cached keys, (1, total): here simply their slot index."""
        return torch.arange(total, device=self.k.device)[None]

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
