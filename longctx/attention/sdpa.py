"""torch's scaled_dot_product_attention, with the mask built only when one is needed."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
):
    """Additive bias for queries [q_start, q_start+Tq) and keys [k_start, k_start+Tk) of a block.

    Query i sits at key index q_offset + i. Returns None (no bias), or (H|1, Tq, Tk) float with -inf where
    masked and -slope*(i - j) for ALiBi (|i - j| when not causal)."""
    if not causal and alibi_slopes is None:
        return None
    if alibi_slopes is None:  # causal only: one (Tq, Tk) boolean, not int64 distances (8x the bytes)
        visible = torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril_(q_start + q_offset - k_start)
        return torch.zeros(1, Tq, Tk, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))
    qi = torch.arange(q_start, q_start + Tq, device=device)[:, None] + q_offset
    kj = torch.arange(k_start, k_start + Tk, device=device)[None, :]
    dist = qi - kj  # (Tq, Tk)
    bias = torch.zeros(1, Tq, Tk, device=device, dtype=dtype)
    if alibi_slopes is not None:
        d = dist if causal else dist.abs()
        bias = -alibi_slopes.to(device=device, dtype=dtype)[:, None, None] * d.to(dtype)
    if causal:
        bias = bias.masked_fill(dist < 0, float("-inf"))
    return bias


def sdpa_attention(
    q, k, v, *, causal=True, q_offset=0, alibi_slopes=None, scale=None, dropout_p=0.0, chunk_size=256
) -> torch.Tensor:
    Tq, Tk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if alibi_slopes is None and (not causal or Tq == 1 or (q_offset == 0 and Tq == Tk)):
        # the fast paths: no mask tensor at all
        is_causal = causal and Tq > 1
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
        )
    bias = attention_bias(
        Tq, Tk, causal=causal, q_offset=q_offset, alibi_slopes=alibi_slopes, device=q.device, dtype=q.dtype
    )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias[None], dropout_p=dropout_p, scale=scale, enable_gqa=gqa
    )
