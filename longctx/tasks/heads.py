"""A classification head on top of our GPT, and pad-key masking for the bidirectional encoder.

Pooling follows what each kind of model can see:
- decoder (`causal=True`): the hidden state of the last real token, the only one that has read the whole
  input (GPT-style sequence classification, as transformers' `*ForSequenceClassification`);
- encoder (`causal=False`): the mean of the hidden states of the real tokens. Every token sees every other,
  so pad tokens would leak into the real ones: `key_padding` masks pad keys inside attention for the call.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from longctx.attention import register_backend, use_backend
from longctx.attention.sdpa import attention_bias
from longctx.errors import ConfigError
from longctx.model import GPT

POOLINGS = ("last", "mean")

_VALID_KEYS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "longctx_valid_keys", default=None
)


def padded_attention(
    q, k, v, *, causal=True, q_offset=0, alibi_slopes=None, scale=None, dropout_p=0.0, chunk_size=256
) -> torch.Tensor:
    """sdpa with the pad keys of each row masked. q: (B, Hq, Tq, hd), k/v: (B, Hkv, Tk, hd).

    Keys in front of the row's own tokens (a learned prefix) are always visible; a pad query still sees
    the real keys, so no row of the softmax is all -inf (which would give NaN)."""
    valid = _VALID_KEYS.get()  # (B, T) True on real tokens
    B, Tq, Tk = q.shape[0], q.shape[-2], k.shape[-2]
    front = Tk - valid.shape[1]
    if front < 0:
        raise ConfigError(f"key padding mask covers {valid.shape[1]} tokens but attention has {Tk} keys")
    keys = F.pad(valid, (front, 0), value=True)  # (B, Tk)
    mask = torch.zeros(B, 1, 1, Tk, device=q.device, dtype=q.dtype).masked_fill(
        ~keys[:, None, None], float("-inf")
    )
    bias = attention_bias(
        Tq, Tk, causal=causal, q_offset=q_offset, alibi_slopes=alibi_slopes, device=q.device, dtype=q.dtype
    )  # (H|1, Tq, Tk) or None
    if bias is not None:
        mask = mask + bias[None]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


register_backend("padded", padded_attention)


@contextlib.contextmanager
def key_padding(lengths: torch.Tensor, T: int) -> Iterator[None]:
    """Inside: every attention call masks keys at positions >= lengths[b] of row b. A no-op when no row
    is padded (the fast unmasked kernels stay in use)."""
    if bool((lengths >= T).all()):
        yield
        return
    valid = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)
    token = _VALID_KEYS.set(valid)
    try:
        with use_backend("padded"):
            yield
    finally:
        _VALID_KEYS.reset(token)


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
        if self.backbone.config.causal:
            h = self.backbone.hidden_states(input_ids)  # (B, T, d); pads come after every real token
        else:
            with key_padding(lengths, T):
                h = self.backbone.hidden_states(input_ids)  # (B, T, d)
        if self.pooling == "last":
            return h[torch.arange(B, device=h.device), lengths - 1]
        real = (torch.arange(T, device=h.device)[None, :] < lengths[:, None]).to(h.dtype)  # (B, T)
        return (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """-> (B, n_classes) logits."""
        return self.head(self.pooled(input_ids, lengths))
