"""A classification head on top of our GPT.

Pooling follows what each kind of model can see:
- decoder (`causal=True`): the hidden state of the last real token, the only one that has read the whole
  input (GPT-style sequence classification, as transformers' `*ForSequenceClassification`);
- encoder (`causal=False`): the mean of the hidden states of the real tokens. Every token sees every other,
  so pad tokens would leak into the real ones: the forward gets a key mask of the padding
  (`KeyMask.from_lengths`), which every attention backend honours.
"""

from __future__ import annotations

import torch
from torch import nn

from longctx.attention import KeyMask
from longctx.errors import ConfigError
from longctx.model import GPT

POOLINGS = ("last", "mean")


class ClassificationModel(nn.Module):
    """backbone GPT + pooling + a linear head to `n_classes` logits."""

    def __init__(self, backbone: GPT, n_classes: int, pooling: str | None = None):
        super().__init__()
        pooling = pooling or ("last" if backbone.config.causal else "mean")
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.backbone, self.pooling = backbone, pooling
        d = backbone.config.d_model
        self.head = nn.Linear(d, n_classes)
        nn.init.normal_(self.head.weight, std=backbone.config.init_std)
        nn.init.zeros_(self.head.bias)

    def pooled(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) right-padded, lengths (B,) -> (B, d)."""
        B, T = input_ids.shape
        mask = None
        if not self.backbone.config.causal and not bool((lengths >= T).all()):
            mask = KeyMask.from_lengths(lengths, T)  # a causal decoder's pads come after every real token
        h = self.backbone.hidden_states(input_ids, key_mask=mask)  # (B, T, d)
        if self.pooling == "last":
            return h[torch.arange(B, device=h.device), lengths - 1]
        real = (torch.arange(T, device=h.device)[None, :] < lengths[:, None]).to(h.dtype)  # (B, T)
        return (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """-> (B, n_classes) logits."""
        return self.head(self.pooled(input_ids, lengths))
