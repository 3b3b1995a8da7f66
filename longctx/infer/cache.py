"""An explicit KV cache (gpt-fast style): preallocated per layer, filled by position.

The model calls `update(layer_idx, k, v)` in each layer and then advances `length` once per forward.
With `rotate_on_read` the cache holds keys *before* RoPE and the model rotates all of them with the
frequencies of the current call — needed when the rotation depends on the total length (dynamic NTK/YaRN),
otherwise cached keys keep a stale base (transformers issue #25104), and for the streaming mode below.

Three variations, all driven by the same two calls (`reserve` before a forward, `update` inside it):

- streaming (`sinks=`, StreamingLLM, Xiao et al. 2023): capacity = sinks + window. When a forward needs
  more room, the oldest non-sink tokens are evicted and the rest shift down, so every key's position is its
  slot index; keys stay un-rotated and are rotated at read time with those re-assigned positions. Memory is
  constant however long the stream runs.
- int8 (`Int8KVCache`): keys and values stored as int8 with one fp32 scale per (layer, row, head, token)
  (symmetric absmax over the head dim); dequantised on read.
- batched rows of different prompt lengths: prompts are right-aligned and `pad[b]` leading slots of row b
  hold padding; `key_positions` then gives per-row positions (slot - pad) and the engine masks pad keys.
"""

from __future__ import annotations

import torch

from longctx.config import GPTConfig
from longctx.errors import ConfigError


class KVCache:
    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        *,
        device=None,
        dtype: torch.dtype = torch.float32,
        rotate_on_read: bool | None = None,
        sinks: int | None = None,
    ):
        from longctx.positions import build_positions

        if max_len <= 0:
            raise ConfigError(f"KV cache length must be positive, got {max_len}")
        self.config, self.dtype, self.max_len = config, dtype, max_len
        self.shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self._allocate(device)
        self.length = 0  # tokens stored (the model advances it after each forward)
        self.evicted = 0  # tokens dropped by the streaming window (length + evicted = tokens seen)
        self.pad: torch.Tensor | None = None  # (B,) leading padding slots per row, None = no padding
        self.sinks = sinks
        if sinks is not None:
            if not 0 <= sinks < max_len:
                raise ConfigError(
                    f"streaming cache: sinks={sinks} must be in [0, {max_len}) "
                    "(the capacity is sinks + window)"
                )
            # positions are re-assigned on eviction, so keys must be rotated when read, never when stored
            rotate_on_read = True
        if rotate_on_read is None:
            rotate_on_read = config.position == "rope" and build_positions(config).length_dependent
        self.rotate_on_read = rotate_on_read

    # -- storage (Int8KVCache overrides these three) ------------------------------------------------
    def _allocate(self, device) -> None:
        self.k = torch.zeros(self.shape, device=device, dtype=self.dtype)  # (L, B, K, S, hd)
        self.v = torch.zeros(self.shape, device=device, dtype=self.dtype)

    def _slot_tensors(self) -> list[str]:
        """Attribute names of the tensors indexed (layer, row, head, slot, ...): eviction and row selection
        move all of them together."""
        return ["k", "v"]

    def _write_read(self, layer_idx: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[layer_idx, :, :, start:end] = k
        self.v[layer_idx, :, :, start:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    # -- the interface the model and the engine use -------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return getattr(self, self._slot_tensors()[0]).device

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: (B, K, T, hd) for the new tokens -> all keys/values so far (B, K, S, hd)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ConfigError(
                f"KV cache is full: {end} tokens > its {self.max_len} slots; "
                "allocate a longer cache (max_len) or use the streaming mode (sinks)"
            )
        return self._write_read(layer_idx, self.length, k.to(self.dtype), v.to(self.dtype))

    def reserve(self, n: int) -> None:
        """Make room for `n` new tokens before a forward: evicts in streaming mode, else checks capacity."""
        need = self.length + n - self.max_len
        if need <= 0:
            return
        if self.sinks is None:
            raise ConfigError(
                f"KV cache is full: {self.length + n} tokens > its {self.max_len} slots; "
                "allocate a longer cache (max_len) or use the streaming mode (sinks)"
            )
        if self.pad is not None:
            raise ConfigError("the streaming cache does not support padded rows; run requests one by one")
        window = self.max_len - self.sinks
        if n > window:
            raise ConfigError(
                f"streaming cache: a forward of {n} tokens does not fit its window of {window}; "
                "prefill in smaller chunks"
            )
        s, keep = self.sinks, self.length - self.sinks - need  # drop slots [s, s+need), keep the next `keep`
        for name in self._slot_tensors():
            t = getattr(self, name)
            # clone: source and destination overlap
            t[:, :, :, s : s + keep] = t[:, :, :, s + need : s + need + keep].clone()
        self.length -= need
        self.evicted += need

    def key_positions(self, total: int) -> torch.Tensor:
        """Positions of the first `total` cached slots: (1, total) slot indices, or (B, total) with padding.

        In streaming mode slot indices *are* the re-assigned positions (sinks at 0.., window right after)."""
        slots = torch.arange(total, device=self.device)[None]
        if self.pad is None:
            return slots
        return (slots - self.pad[:, None]).clamp_min(0)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (1-D long tensor), e.g. when some requests of a batch finished."""
        for name in self._slot_tensors():
            setattr(self, name, getattr(self, name).index_select(1, rows))
        if self.pad is not None:
            self.pad = self.pad.index_select(0, rows)
        self.shape = (self.shape[0], len(rows), *self.shape[2:])

    def reset(self) -> None:
        self.length = 0
        self.evicted = 0

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self._slot_tensors())


class Int8KVCache(KVCache):
    """Keys and values in int8 with per-(head, token) absmax scales: ~1/4 of an fp32 cache, ~1/2 of bf16.

    Reads return the dequantised keys/values in the cache's `dtype`, written into one layer's buffers that
    every layer reuses, so only one layer's full-precision copy is ever alive."""

    def _allocate(self, device) -> None:
        self.kq = torch.zeros(self.shape, device=device, dtype=torch.int8)  # (L, B, K, S, hd)
        self.vq = torch.zeros(self.shape, device=device, dtype=torch.int8)
        self.ks = torch.zeros(*self.shape[:-1], 1, device=device, dtype=torch.float32)  # (L, B, K, S, 1)
        self.vs = torch.zeros(*self.shape[:-1], 1, device=device, dtype=torch.float32)

    def _slot_tensors(self) -> list[str]:
        return ["kq", "vq", "ks", "vs"]

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (..., hd) -> int8 (..., hd), fp32 scale (..., 1) with x ~= q * scale."""
        x = x.float()
        scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127.0
        return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale

    def _write_read(self, layer_idx: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        for (q_name, s_name), x in ((("kq", "ks"), k), (("vq", "vs"), v)):
            q, scale = self.quantize(x)
            getattr(self, q_name)[layer_idx, :, :, start:end] = q
            getattr(self, s_name)[layer_idx, :, :, start:end] = scale
        # dequantise into one layer's preallocated buffers, in place: a fresh tensor per read (`.to()`) cost
        # 10x the time of the conversion itself in page faults (measured: 14 ms vs 1.5 ms for 16K tokens)
        shape = (*self.shape[1:3], self.max_len, self.shape[4])
        if getattr(self, "_buf", None) is None or self._buf[0].shape != shape:
            self._buf = tuple(torch.empty(shape, device=self.device, dtype=self.dtype) for _ in range(2))
        out = []
        for buf, q_name, s_name in zip(self._buf, ("kq", "vq"), ("ks", "vs")):
            view = buf[:, :, :end]  # (B, K, S, hd); the next layer overwrites it, after this one has read it
            view.copy_(getattr(self, q_name)[layer_idx, :, :, :end]).mul_(
                getattr(self, s_name)[layer_idx, :, :, :end]
            )
            out.append(view)
        return out[0], out[1]


def make_cache(
    config: GPTConfig,
    batch_size: int,
    max_len: int,
    *,
    device=None,
    dtype: torch.dtype = torch.float32,
    sinks: int | None = None,
    int8: bool = False,
) -> KVCache:
    """The cache for a generation: `sinks` turns on streaming (max_len = sinks + window), `int8` quantises."""
    cls = Int8KVCache if int8 else KVCache
    return cls(config, batch_size, max_len, device=device, dtype=dtype, sinks=sinks)
