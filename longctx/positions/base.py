"""The interface every position encoding implements, and the registry that picks one by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from longctx.errors import ConfigError


class PositionConfig(Protocol):
    """What a position encoding reads of a model config (`longctx.config.PositionConfig` is one). Positions
    depend on this, not on the config module, so the config can ask the position registries for the names
    it accepts without an import circle."""

    position: str
    n_head: int
    d_model: int
    max_seq_len: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None

    @property
    def rotary_dim(self) -> int: ...

    @property
    def rope_type(self) -> str: ...

    def replace(self, **changes: Any) -> PositionConfig: ...


REGISTRY: dict[str, type[Positions]] = {}


def register(name: str) -> Callable[[type[Positions]], type[Positions]]:
    def deco(cls: type[Positions]) -> type[Positions]:
        REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


class Positions(nn.Module):
    """Default behaviour: no position information at all (NoPE); subclasses override one hook."""

    name = "none"
    # True when the rotation of a key depends on the whole sequence length (dynamic NTK/YaRN): a KV cache
    # must then keep keys un-rotated and rotate them at read time, or cached and uncached runs disagree
    # (transformers issue #25104).
    length_dependent = False

    def __init__(self, config: PositionConfig):
        super().__init__()
        self.config = config

    def embed(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return x  # x: (B, T, d)

    def rotary(self, position_ids: torch.Tensor, seq_len: int | None = None):
        return None

    @property
    def alibi_slopes(self) -> torch.Tensor | None:
        return None


@register("none")
class NoPositions(Positions):
    """NoPE: causal attention alone carries order (Kazemnejad et al., 2023)."""


def build_positions(config: PositionConfig) -> Positions:
    if config.position not in REGISTRY:
        raise ConfigError(f"unknown position type {config.position!r}; registered: {', '.join(REGISTRY)}")
    return REGISTRY[config.position](config)
