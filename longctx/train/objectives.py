"""What a training step minimises, injected into the `Trainer`: `loss(model, batch) -> scalar`.

`TokenLoss` is the language-model objective for every token-level target: next-token prediction (labels
shifted by the packer) and masked-token prediction (labels on the masked positions, `--objective mlm`) are
the same chunked cross-entropy over different labels. An `attention` backend given here (S²-Attn while
extending) rides in every forward of the step; a context-parallel step brings its own (ring attention),
and the two cannot be combined.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from longctx.errors import ConfigError
from longctx.train.loss import LossBuffers, lm_loss


class TokenLoss:
    def __init__(self, chunk_size: int | None = 1024, attention: Callable[..., torch.Tensor] | None = None):
        self.chunk_size, self.attention = chunk_size, attention
        self.buffers = LossBuffers()  # the loss's scratch, kept from step to step

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        if self.attention is not None:
            if batch.get("attention") is not None:
                raise ConfigError(
                    "context parallel runs ring attention, which cannot combine with another attention "
                    "wrapper (--s2-attn); drop one of them"
                )
            batch = {**batch, "attention": self.attention}
        return lm_loss(model, batch, self.chunk_size, self.buffers)
