"""Absolute positions added to the token embeddings: learned (GPT-2) and sinusoidal (Vaswani et al.)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from longctx.errors import ConfigError
from longctx.positions.base import PositionConfig, Positions, register


@register("learned")
class LearnedPositions(Positions):
    """A table of max_seq_len vectors. It cannot address a position past the table: extend it by
    interpolating the table (`interpolate_to`), as done for ViT/BERT position tables."""

    def __init__(self, config: PositionConfig):
        super().__init__(config)
        self.table = nn.Embedding(config.max_seq_len, config.d_model)

    def embed(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        n = self.table.num_embeddings
        if int(position_ids.max()) >= n:
            raise ConfigError(
                f"position {int(position_ids.max())} is past the learned table ({n} rows); "
                "extend the model first (`longctx extend --method linear`)"
            )
        return x + self.table(position_ids)

    @torch.no_grad()
    def interpolate_to(self, new_len: int) -> None:
        """Stretch the table to `new_len` rows by linear interpolation (position i -> i * old/new)."""
        old = self.table.weight.data  # (n, d)
        new = F.interpolate(old.T[None], size=new_len, mode="linear", align_corners=True)[0].T
        self.table = nn.Embedding(new_len, old.shape[1], device=old.device, dtype=old.dtype)
        self.table.weight.data.copy_(new)


@register("sinusoidal")
class SinusoidalPositions(Positions):
    """Fixed sin/cos features of the absolute position; defined for every position, so it 'extends' as is
    (quality past the trained length is not promised)."""

    def embed(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        half = d // 2
        freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
        ang = position_ids.to(torch.float32)[..., None] * freq  # (B, T, d/2)
        pe = torch.cat([ang.sin(), ang.cos()], dim=-1)
        if pe.shape[-1] < d:
            pe = F.pad(pe, (0, d - pe.shape[-1]))
        return x + pe.to(x.dtype)
