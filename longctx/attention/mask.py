"""Which keys a query may see besides the causal rule: the key mask of padded rows, and the one additive bias
(causal, ALiBi, key mask) every masked attention path builds from it.

A `KeyMask` rides in the model's forward context (`longctx.model.ForwardContext`), never in global state:
the engine's left-padded batches (`KVCache.pad`), a right-padded encoder batch (`KeyMask.from_lengths`),
a prefix of learned keys in front (`prepend`). One rule keeps every softmax row finite: a query always
sees its own key (a pad query then attends to itself only; an all -inf row would give NaN, and NaN
poisons real rows through p @ v even at probability 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class KeyMask:
    """visible (B, S) bool: True where a key may be attended. starts (B,): set when each row's visible keys
    are one suffix [starts[b], S) (left padding), so a decode kernel needs no mask tensor at all."""

    visible: torch.Tensor
    starts: torch.Tensor | None = None

    @classmethod
    def from_padding(cls, pad: torch.Tensor, total: int) -> KeyMask:
        """Left padding: the first pad[b] keys of row b are padding."""
        slots = torch.arange(total, device=pad.device)
        return cls(slots[None, :] >= pad[:, None], pad)

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, total: int) -> KeyMask:
        """Right padding: keys at positions >= lengths[b] of row b are padding."""
        return cls(torch.arange(total, device=lengths.device)[None, :] < lengths[:, None])

    def prepend(self, n: int) -> KeyMask:
        """n always-visible keys in front (a learned prefix)."""
        starts = None if self.starts is None or n else self.starts
        return KeyMask(F.pad(self.visible, (n, 0), value=True), starts)

    def covering(self, total: int) -> torch.Tensor:
        """visible for exactly `total` keys (the last ones, when keys were added in front)."""
        extra = total - self.visible.shape[1]
        if extra < 0:
            raise ValueError(f"key mask covers {self.visible.shape[1]} keys, attention has {total}")
        return F.pad(self.visible, (extra, 0), value=True) if extra else self.visible


def attention_bias(
    Tq: int,
    Tk: int,
    *,
    causal: bool,
    q_offset: int,
    alibi_slopes: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
    q_start: int = 0,
    k_start: int = 0,
    key_mask: KeyMask | None = None,
    total_keys: int | None = None,
):
    """Additive bias for queries [q_start, q_start+Tq) and keys [k_start, k_start+Tk) of a block.

    Query i sits at key index q_offset + i. Returns None (no bias), (H|1, Tq, Tk) without a key mask, or
    (B, H|1, Tq, Tk) with one; -inf where masked, -slope*(i - j) for ALiBi (|i - j| when not causal).
    total_keys: how many keys the whole call has (the key mask's width), default Tk."""
    if not causal and alibi_slopes is None and key_mask is None:
        return None
    qi = torch.arange(q_start, q_start + Tq, device=device)[:, None] + q_offset
    kj = torch.arange(k_start, k_start + Tk, device=device)[None, :]
    bias = torch.zeros(1, Tq, Tk, device=device, dtype=dtype)
    if alibi_slopes is not None:
        dist = qi - kj  # (Tq, Tk)
        d = dist if causal else dist.abs()
        bias = -alibi_slopes.to(device=device, dtype=dtype)[:, None, None] * d.to(dtype)
    if causal:  # one (Tq, Tk) boolean, not int64 distances (8x the bytes)
        visible = torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril_(q_start + q_offset - k_start)
        bias = bias.masked_fill(~visible, float("-inf"))
    if key_mask is None:
        return bias
    keys = key_mask.covering(total_keys or Tk)[:, k_start : k_start + Tk].to(device)  # (B, Tk)
    allowed = keys[:, None, :] | (kj == qi)[None]  # (B, Tq, Tk): a query always sees itself
    return bias[None].masked_fill(~allowed[:, None], float("-inf"))
