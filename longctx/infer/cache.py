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
- 16-bit storage (`storage=torch.float16 / bfloat16` under an fp32 model): half the memory of an fp32
  cache. Decode steps on CPU hand the 16-bit keys/values straight to the native decode kernel
  (`longctx.infer.native`), which widens them in registers; every other read is dequantised into one
  layer's reused fp32 buffers.
- int8 (`Int8KVCache`): keys and values stored as int8 with one fp32 scale per (layer, row, head, token)
  (symmetric absmax over the head dim); dequantised on read.
- batched rows of different prompt lengths: prompts are right-aligned and `pad[b]` leading slots of row b
  hold padding; `key_positions` then gives per-row positions (slot - pad) and the engine masks pad keys.
"""

from __future__ import annotations

import torch

from longctx.config import GPTConfig
from longctx.errors import ConfigError
from longctx.infer import native


class KVCache:
    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        *,
        device=None,
        dtype: torch.dtype = torch.float32,
        storage: torch.dtype | None = None,
        rotate_on_read: bool | None = None,
        sinks: int | None = None,
    ):
        """dtype: what reads return (the model's dtype); storage: what the cache holds (default dtype)."""
        from longctx.positions import build_positions

        if max_len <= 0:
            raise ConfigError(f"KV cache length must be positive, got {max_len}")
        self.config, self.dtype, self.max_len = config, dtype, max_len
        self.storage = dtype if storage is None else storage
        self.shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self._allocate(device)
        self.length = 0  # tokens stored (the model calls `advance` after each forward)
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
        # name -> (keys under that map, (L, B, K, max_len, hd); slots mapped so far per layer): `mapped_keys`
        self._mapped: dict[str, tuple[torch.Tensor, list[int]]] = {}

    # -- storage (Int8KVCache overrides these three) ------------------------------------------------
    def _allocate(self, device) -> None:
        self.k = torch.zeros(self.shape, device=device, dtype=self.storage)  # (L, B, K, S, hd)
        self.v = torch.zeros(self.shape, device=device, dtype=self.storage)

    def _slot_tensors(self) -> list[str]:
        """Attribute names of the tensors indexed (layer, row, head, slot, ...): eviction and row selection
        move all of them together."""
        return ["k", "v"]

    def _write_read(self, layer_idx: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[layer_idx, :, :, start:end] = k
        self.v[layer_idx, :, :, start:end] = v
        k_all, v_all = self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]  # (B, K, S, hd)
        if self.storage == self.dtype or self._native_decode(k.shape[2]):
            return k_all, v_all
        return self._dequantized(end, lambda buf, i: buf.copy_((k_all, v_all)[i]))

    def _native_decode(self, new_tokens: int) -> bool:
        """Whether this read is a decode step the native kernel serves from the stored 16-bit values as they
        are (keys are not re-rotated on read, one new token, CPU)."""
        return (
            new_tokens == 1 and not self.rotate_on_read and self.device.type == "cpu" and native.available()
        )

    def _dequantized(self, end: int, fill) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [0, end) in `dtype`, written by `fill(buffer_view, 0 for keys | 1 for values)` into
        one layer's preallocated buffers that every layer reuses, so only one layer's full-precision copy is
        ever alive. A fresh tensor per read (`.to()`) cost 10x the conversion itself in page faults (measured:
        14 ms vs 1.5 ms for 16K tokens)."""
        shape = (*self.shape[1:3], self.max_len, self.shape[4])
        if getattr(self, "_buf", None) is None or self._buf[0].shape != shape:
            self._buf = tuple(torch.empty(shape, device=self.device, dtype=self.dtype) for _ in range(2))
        views = [buf[:, :, :end] for buf in self._buf]  # (B, K, S, hd); the next layer overwrites them
        for i, view in enumerate(views):
            fill(view, i)
        return views[0], views[1]

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
        for _, mapped in self._mapped.values():  # slots from `length` on are rewritten: map them again
            mapped[layer_idx] = min(mapped[layer_idx], self.length)
        return self._write_read(layer_idx, self.length, k.to(self.dtype), v.to(self.dtype))

    def mapped_keys(self, layer_idx: int, name: str, keys: torch.Tensor, fn) -> torch.Tensor:
        """Layer `layer_idx`'s keys [0, S) under a map that depends on the slot alone (a context method's
        rotation of one region), (B, K, S, hd), kept in the cache's float storage (the model's dtype under
        int8) and laid out as the values are. `keys` are the stored keys as `update` returned them; the slots
        not mapped yet are `fn(keys[:, :, a:S], a)`, and only those are computed. Why: a decode step rotated
        every cached key for every region and layer (Self-Extend on SmolLM2 at 8K: half of each step). The
        cost is one more key cache per name, allocated on first use; slots rewritten are mapped again, and
        anything that moves slots (eviction, rows selected or loaded, reset) drops the mapping."""
        S = keys.shape[2]
        if name not in self._mapped:
            dtype = self.storage if self.storage.is_floating_point else self.dtype
            store = torch.empty(self.shape, device=self.device, dtype=dtype)
            self._mapped[name] = (store, [0] * self.shape[0])
        store, mapped = self._mapped[name]
        a = mapped[layer_idx]
        if a < S:
            store[layer_idx, :, :, a:S] = fn(keys[:, :, a:S], a)
            mapped[layer_idx] = S
        return store[layer_idx, :, :, :S]

    def key_store(self, name: str) -> tuple[torch.Tensor, list[int]] | None:
        """The keys `mapped_keys` keeps under `name`, (L, B, K, max_len, hd), and the slots mapped per layer
        (None before its first use). The fused decode step writes slot `length` of every layer itself and
        then counts it here."""
        return self._mapped.get(name)

    def _unmap(self) -> None:
        for _, mapped in self._mapped.values():
            mapped[:] = [0] * len(mapped)

    def advance(self, n: int) -> None:
        """The model's forward has written `n` new tokens into every layer: count them as stored. An fp16
        cache checks them first (once per forward, all layers in one op): a key or value past fp16's range
        would be stored as inf and turn every later attention output into NaN."""
        if self.storage == torch.float16:
            new = slice(self.length, self.length + n)
            if not (self.k[:, :, :, new].isfinite().all() and self.v[:, :, :, new].isfinite().all()):
                raise ConfigError("keys or values exceed fp16's range (65504); use kv_dtype bf16 or fp32")
        self.length += n

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
        self._unmap()

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
        self._mapped.clear()

    def row_states(self, row: int, start: int, n: int) -> dict[str, torch.Tensor]:
        """Copies of row `row`'s stored states in slots [start, start + n) (every layer; the prompt cache
        keeps these): {slot tensor name: (layers, heads, n, ...)}."""
        return {
            name: getattr(self, name)[:, row, :, start : start + n].clone() for name in self._slot_tensors()
        }

    def load_row(self, row: int, start: int, states: dict[str, torch.Tensor], n: int) -> None:
        """Write the first `n` tokens of `states` (from `row_states` of a cache like this one) into row
        `row`'s slots [start, start + n). The caller sets `length` to where the next forward writes."""
        for name in self._slot_tensors():
            getattr(self, name)[:, row, :, start : start + n] = states[name][:, :, :n]
        self._unmap()

    def reset(self) -> None:
        self.length = 0
        self.evicted = 0
        self._unmap()

    @property
    def nbytes(self) -> int:
        stores = sum(store.nbytes for store, _ in self._mapped.values())
        return stores + sum(getattr(self, name).nbytes for name in self._slot_tensors())


class Int8KVCache(KVCache):
    """Keys and values in int8 with per-(head, token) absmax scales: ~1/4 of an fp32 cache, ~1/2 of bf16.

    Reads return the dequantised keys/values in the cache's `dtype` (`KVCache._dequantized`)."""

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

        def fill(view: torch.Tensor, i: int) -> None:
            q_name, s_name = ("kq", "ks") if i == 0 else ("vq", "vs")
            view.copy_(getattr(self, q_name)[layer_idx, :, :, :end]).mul_(
                getattr(self, s_name)[layer_idx, :, :, :end]
            )

        return self._dequantized(end, fill)


KV_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


def check_kv_dtype(kv_dtype: str) -> None:
    if kv_dtype != "auto" and kv_dtype not in KV_DTYPES:
        raise ConfigError(f"unknown KV cache dtype {kv_dtype!r}; choose auto, {', '.join(KV_DTYPES)}")


def make_cache(
    config: GPTConfig,
    batch_size: int,
    max_len: int,
    *,
    device=None,
    dtype: torch.dtype = torch.float32,
    sinks: int | None = None,
    kv_dtype: str = "auto",
) -> KVCache:
    """The cache for a generation: `sinks` turns on streaming (max_len = sinks + window); `kv_dtype` is what
    the cache stores: auto (the model's dtype: exact), fp32, fp16, bf16 (half of fp32), int8 (quantised)."""
    check_kv_dtype(kv_dtype)
    storage = None if kv_dtype == "auto" else KV_DTYPES[kv_dtype]
    cls = Int8KVCache if kv_dtype == "int8" else KVCache
    return cls(config, batch_size, max_len, device=device, dtype=dtype, storage=storage, sinks=sinks)
