"""Exact attention in blocks, O(L) memory: online softmax in the forward, recomputation in the backward
(the FlashAttention-2 algorithm, written with torch ops so it runs on any device).

Grouped-query attention is handled by viewing q as (B, Hkv, G, T, hd) and broadcasting k, v over G, so
keys and values are never copied per query head.
"""

from __future__ import annotations

import math

import torch

from longctx.attention.mask import attention_bias
from longctx.errors import ConfigError


def _block_bias(qs, qe, ks, ke, *, causal, q_offset, slopes, device, dtype, Hkv, G, key_mask=None, Tk=None):
    """Bias for the (qs:qe, ks:ke) block, shaped to broadcast over (B, Hkv, G, Tq, Tk), or None."""
    bias = attention_bias(
        qe - qs,
        ke - ks,
        causal=causal,
        q_offset=q_offset,
        alibi_slopes=slopes,
        device=device,
        dtype=dtype,
        q_start=qs,
        k_start=ks,
        key_mask=key_mask,
        total_keys=Tk,
    )
    if bias is None:
        return None
    if key_mask is None:
        bias = bias[None]  # (1, H|1, Tq, Tk)
    lead = bias.shape[0]
    if bias.shape[1] == 1:
        return bias[:, None]  # (B|1, 1, 1, Tq, Tk)
    return bias.view(lead, Hkv, G, qe - qs, ke - ks)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    # accumulate in fp32 at least (bf16/fp16 inputs), fp64 when the inputs are fp64 (reference checks)
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _key_end(qe: int, Tk: int, causal: bool, q_offset: int) -> int:
    # keys after the last query's own index are all masked: skip those blocks entirely
    return min(Tk, q_offset + qe) if causal else Tk


def block_forward(
    q, k, v, *, causal: bool, q_offset: int, slopes, scale: float, chunk: int, key_mask=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax attention of q over k, v: the (out, lse) pair a caller can merge with other key blocks
    (ring attention). q: (B, Hq, Tq, hd); k, v: (B, Hkv, Tk, hd).

    Returns out (B, Hq, Tq, hd) and lse (B, Hq, Tq), both in the accumulation dtype; a row with every key
    masked gets out 0 and lse -inf."""
    B, Hq, Tq, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    acc = _acc_dtype(q)
    q5 = q.view(B, Hkv, G, Tq, hd)
    k5, v5 = k[:, :, None], v[:, :, None]  # (B, Hkv, 1, Tk, hd)
    out = torch.empty(q5.shape, device=q.device, dtype=acc)
    lse = torch.empty(B, Hkv, G, Tq, device=q.device, dtype=acc)
    geo = dict(
        causal=causal, q_offset=q_offset, slopes=slopes, device=q.device, dtype=acc, Hkv=Hkv, G=G,
        key_mask=key_mask, Tk=Tk,
    )  # fmt: skip
    for qs in range(0, Tq, chunk):
        qe = min(qs + chunk, Tq)
        qc = q5[:, :, :, qs:qe].to(acc)
        m = torch.full(qc.shape[:-1], float("-inf"), device=q.device, dtype=acc)
        den = torch.zeros_like(m)
        o = torch.zeros_like(qc)
        for ks in range(0, _key_end(qe, Tk, causal, q_offset), chunk):
            ke = min(ks + chunk, Tk)
            s = (qc @ k5[:, :, :, ks:ke].to(acc).transpose(-1, -2)) * scale  # (B, Hkv, G, tq, tk)
            bias = _block_bias(qs, qe, ks, ke, **geo)
            if bias is not None:
                s = s + bias
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            corr = torch.exp(m - m_safe)
            den = den * corr + p.sum(-1)
            o = o * corr[..., None] + p @ v5[:, :, :, ks:ke].to(acc)
            m = m_new
        out[:, :, :, qs:qe] = o / den.clamp_min(1e-30)[..., None]
        lse[:, :, :, qs:qe] = m + den.clamp_min(1e-30).log()
    return out.view(B, Hq, Tq, hd), lse.view(B, Hq, Tq)


def block_backward(
    q, k, v, out, lse, dout, *, causal: bool, q_offset: int, slopes, scale: float, chunk: int, key_mask=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v through one key block, given the *final* out (B, Hq, Tq, hd) and lse (B, Hq, Tq)
    of the rows (over all key blocks): p = exp(s - lse) is then this block's exact share of the softmax, so
    summing the results over blocks gives the full gradient. Returns dq, dk, dv in the accumulation dtype."""
    B, Hq, Tq, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    acc = _acc_dtype(q)
    q5 = q.view(B, Hkv, G, Tq, hd)
    k5, v5 = k[:, :, None], v[:, :, None]
    do5 = dout.reshape(B, Hkv, G, Tq, hd)
    lse = lse.reshape(B, Hkv, G, Tq)
    delta = (do5.to(acc) * out.reshape(B, Hkv, G, Tq, hd).to(acc)).sum(-1)  # (B, Hkv, G, Tq): rowsum(dO*O)
    dq = torch.zeros(q5.shape, device=q.device, dtype=acc)
    dk = torch.zeros(k.shape, device=q.device, dtype=acc)
    dv = torch.zeros(v.shape, device=q.device, dtype=acc)
    geo = dict(
        causal=causal, q_offset=q_offset, slopes=slopes, device=q.device, dtype=acc, Hkv=Hkv, G=G,
        key_mask=key_mask, Tk=Tk,
    )  # fmt: skip
    for qs in range(0, Tq, chunk):
        qe = min(qs + chunk, Tq)
        qc, doc = q5[:, :, :, qs:qe].to(acc), do5[:, :, :, qs:qe].to(acc)
        lse_c, delta_c = lse[:, :, :, qs:qe, None], delta[:, :, :, qs:qe, None]
        dqc = torch.zeros_like(qc)
        for ks in range(0, _key_end(qe, Tk, causal, q_offset), chunk):
            ke = min(ks + chunk, Tk)
            kc, vc = k5[:, :, :, ks:ke].to(acc), v5[:, :, :, ks:ke].to(acc)
            s = (qc @ kc.transpose(-1, -2)) * scale
            bias = _block_bias(qs, qe, ks, ke, **geo)
            if bias is not None:
                s = s + bias
            p = torch.exp(s - lse_c)  # (B, Hkv, G, tq, tk); masked entries -> 0
            dv[:, :, ks:ke] += (p.transpose(-1, -2) @ doc).sum(2)
            dp = doc @ vc.transpose(-1, -2)
            ds = p * (dp - delta_c)
            dqc += (ds @ kc) * scale
            dk[:, :, ks:ke] += (ds.transpose(-1, -2) @ qc).sum(2) * scale
        dq[:, :, :, qs:qe] = dqc
    return dq.view(B, Hq, Tq, hd), dk, dv


class ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, q_offset: int, slopes, scale: float, chunk: int, key_mask):
        out, lse = block_forward(
            q, k, v, causal=causal, q_offset=q_offset, slopes=slopes, scale=scale, chunk=chunk,
            key_mask=key_mask,
        )  # fmt: skip
        out = out.to(q.dtype)  # (B, Hq, Tq, hd)
        ctx.save_for_backward(q, k, v, out, lse, slopes if slopes is not None else torch.empty(0))
        ctx.cfg = (causal, q_offset, slopes is not None, scale, chunk, key_mask)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, slopes = ctx.saved_tensors
        causal, q_offset, has_slopes, scale, chunk, key_mask = ctx.cfg
        dq, dk, dv = block_backward(
            q,
            k,
            v,
            out,
            lse,
            dout,
            causal=causal,
            q_offset=q_offset,
            slopes=slopes if has_slopes else None,
            scale=scale,
            chunk=chunk,
            key_mask=key_mask,
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def chunked_attention(
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
) -> torch.Tensor:
    if dropout_p > 0.0:
        raise ConfigError(
            "the chunked attention backend has no attention dropout; set dropout=0 or use attn_backend='sdpa'"
        )
    if q.shape[1] % k.shape[1]:
        raise ConfigError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return ChunkedAttention.apply(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        causal,
        int(q_offset),
        alibi_slopes,
        float(scale),
        int(chunk_size),
        key_mask,
    )
