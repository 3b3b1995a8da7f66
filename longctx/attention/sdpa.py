"""torch's scaled_dot_product_attention, with the mask built only when one is needed."""

from __future__ import annotations

import torch.nn.functional as F

from longctx.attention.mask import attention_bias


def sdpa_attention(
    q,
    k,
    v,
    *,
    causal=True,
    q_offset=0,
    alibi_slopes=None,
    key_mask=None,
    scale=None,
    dropout_p=0.0,
    chunk_size=256,
):
    Tq, Tk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if k.dtype != q.dtype:  # a 16-bit KV cache read by an fp32 model
        k, v = k.to(q.dtype), v.to(q.dtype)
    if key_mask is None and alibi_slopes is None and (not causal or Tq == 1 or (q_offset == 0 and Tq == Tk)):
        # the fast paths: no mask tensor at all
        is_causal = causal and Tq > 1
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
        )
    bias = attention_bias(
        Tq,
        Tk,
        causal=causal,
        q_offset=q_offset,
        alibi_slopes=alibi_slopes,
        device=q.device,
        dtype=q.dtype,
        key_mask=key_mask,
    )
    mask = bias if key_mask is not None else bias[None]  # (B|1, H|1, Tq, Tk)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
    )
