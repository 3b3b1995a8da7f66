"""Rotary position embedding (Su et al., 2021) and its scalings, keyed exactly as Hugging Face's
`rope_scaling["rope_type"]`.

Each entry of ROPE_INIT_FUNCTIONS maps (config, seq_len) -> (inv_freq, attention_factor), the same contract
as transformers' `modeling_rope_utils`: inv_freq has rotary_dim/2 entries, and the attention factor
multiplies cos and sin (so q·k is scaled by its square — YaRN's temperature). `seq_len` matters only for the
length-dependent types (dynamic NTK), which the cache must treat specially (see `Positions.length_dependent`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from longctx.config import GPTConfig
from longctx.errors import ConfigError
from longctx.positions.base import Positions, register

RopeInit = Callable[[GPTConfig, "int | None"], "tuple[torch.Tensor, float]"]


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    # 1 / base^(2i/d), i = 0..d/2-1, computed in int64 -> float like HF so the bits match
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def _scaling(config: GPTConfig) -> dict:
    return dict(config.rope_scaling or {})


def default_rope(config: GPTConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(config.rotary_dim, config.rope_theta), 1.0


def linear_rope(config: GPTConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Position interpolation (Chen et al., 2023): every position is divided by `factor`."""
    factor = float(_scaling(config)["factor"])
    return _base_inv_freq(config.rotary_dim, config.rope_theta) / factor, 1.0


ROPE_INIT_FUNCTIONS: dict[str, RopeInit] = {
    "default": default_rope,
    "linear": linear_rope,
}
# types whose frequencies change with the current sequence length
LENGTH_DEPENDENT_TYPES: set[str] = set()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (B, T, rd) with rd <= hd. Rotates the first rd dims (HF's half-split
    layout, so HF weights load unchanged) and passes the rest through (partial rotary)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, rd)
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat([xr * cos + rotate_half(xr) * sin, xp], dim=-1)


@register("rope")
class RotaryPositions(Positions):
    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.rope_type = config.rope_type
        if self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ConfigError(f"unknown rope_scaling type {self.rope_type!r}; "
                              f"known: {', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
        self.init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        self.length_dependent = self.rope_type in LENGTH_DEPENDENT_TYPES
        inv_freq, self.attention_scaling = self.init_fn(config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._dyn_cache: tuple[int, torch.Tensor, float] | None = None

    def frequencies(self, seq_len: int) -> tuple[torch.Tensor, float]:
        if not self.length_dependent:
            return self.inv_freq, self.attention_scaling
        if self._dyn_cache is None or self._dyn_cache[0] != seq_len:
            inv, af = self.init_fn(self.config, seq_len)
            self._dyn_cache = (seq_len, inv.to(self.inv_freq.device), af)
        return self._dyn_cache[1], self._dyn_cache[2]

    def rotary(self, position_ids: torch.Tensor, seq_len: int | None = None):
        """position_ids: (B, T) -> cos, sin: (B, T, rotary_dim), float32, already times the attention factor.
        seq_len: the length the frequencies are chosen for (dynamic types); default max(position)+1."""
        if seq_len is None and self.length_dependent:
            seq_len = int(position_ids.max()) + 1
        inv_freq, af = self.frequencies(seq_len or 0)
        freqs = position_ids.to(torch.float32)[..., None] * inv_freq.to(position_ids.device)  # (B, T, rd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * af, emb.sin() * af
