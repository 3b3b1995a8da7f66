"""One query per row over a long KV cache on CPU: the decode step's attention, in `longctx/kernels/decode.c`.

torch's CPU attention for this shape (one query against thousands of cached keys) reads memory at about
half the machine's bandwidth; the kernel streams keys and values once, reads fp16/bf16 caches as they are
stored (widening in registers), and takes left padding as a start index per row (no mask tensor). `auto`
in `longctx.attention.dispatch` picks it for a decode step whenever `supports` says yes.
"""

from __future__ import annotations

import torch

from longctx.kernels import available, library

KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the C file's KV_F32, KV_F16, KV_BF16
INT8 = 3  # KV_I8: int8 keys/values with a scale per token (Int8KVCache's layout), for `decode_attention` only


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """One fp32 query per head on CPU; keys and values fp32, fp16 or bf16 in the cache's layout (rows of hd
    contiguous values, same strides for k and v)."""
    B, H, Tq, hd = q.shape
    return (
        Tq == 1
        and q.device.type == k.device.type == "cpu"
        and q.dtype == torch.float32
        and k.dtype == v.dtype
        and k.dtype in KINDS
        and hd % 8 == 0
        and k.shape == v.shape
        and k.shape[0] == B
        and k.shape[-1] == hd
        and H % k.shape[1] == 0
        and k.stride() == v.stride()
        and k.stride(-1) == 1
        and k.stride(-2) == hd
        and not (torch.is_grad_enabled() and q.requires_grad)
        and available()
    )


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    starts: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, H, 1, hd) over k/v (B, K, S, hd) -> (B, H, 1, hd). The query sits after the last key (a decode
    step: every key is visible). starts (B,): the first visible key of each row (leading padding);
    alibi_slopes (H,): ALiBi bias -slope * distance. The caller checks `supports` first. int8 k/v take
    `scales`: fp32 (B, K, S, 1) for keys and values, laid out as k and v are (an Int8KVCache's). lse: an fp32
    (B, H, 1) tensor that receives each head's logsumexp of its scores (to merge with attention over other
    keys, as the context methods' regions do)."""
    B, H, _, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q = q.contiguous()
    out = torch.empty_like(q)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.numel() == B * H
    work = torch.empty(B * H * S, dtype=torch.float32)
    if starts is not None:
        starts = starts.to(torch.int64).contiguous()
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(torch.float32).contiguous()
    ks, vs = (None, None) if scales is None else (s.data_ptr() for s in scales)
    library().lc_decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), ks, vs, out.data_ptr(),
        None if lse is None else lse.data_ptr(), work.data_ptr(),
        B, Hkv, H // Hkv, S, hd, k.stride(0), k.stride(1), INT8 if scales is not None else KINDS[k.dtype],
        None if starts is None else starts.data_ptr(),
        None if alibi_slopes is None else alibi_slopes.data_ptr(),
        hd**-0.5 if scale is None else scale, torch.get_num_threads(),
    )  # fmt: skip
    return out


def cpu_decode_attention(
    q, k, v, *, causal=True, q_offset=0, alibi_slopes=None, key_mask=None, scale=None, dropout_p=0.0,
    chunk_size=256,
) -> torch.Tensor:  # fmt: skip
    """The backend: a decode step (one query after every key); anything else goes to SDPA."""
    starts = None if key_mask is None else key_mask.starts
    if (
        supports(q, k, v)
        and q_offset == k.shape[-2] - 1
        and dropout_p == 0.0
        and (key_mask is None or starts is not None)
    ):
        return decode_attention(q, k, v, scale=scale, starts=starts, alibi_slopes=alibi_slopes)
    from longctx.attention.sdpa import sdpa_attention

    return sdpa_attention(
        q, k, v, causal=causal, q_offset=q_offset, alibi_slopes=alibi_slopes, key_mask=key_mask,
        scale=scale, dropout_p=dropout_p,
    )  # fmt: skip
