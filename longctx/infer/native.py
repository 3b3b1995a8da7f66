"""The decode step's native kernels (`longctx/kernels/decode.c`), each behind a check of whether it takes
the call.

Why native code: a decode step streams every weight and the whole KV cache once per token, and torch's CPU
kernels for these shapes (one row against a matrix; one query against a long cache) read memory at about
half the machine's bandwidth (the numbers are in the C file's header). Two plain loops at bandwidth make
decoding up to ~1.5x faster, and let a 16-bit cache be read without an fp32 copy. Where the kernels are
unavailable (`longctx.kernels`: no AVX2, no compiler, LONGCTX_NATIVE=0) every `*_ok` is False and callers
use torch.
"""

from __future__ import annotations

import torch

from longctx.kernels import available, library, unavailable_reason

__all__ = ["available", "unavailable_reason", "linear_ok", "linear", "attention_ok", "decode_attention"]

KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the C file's KV_F32, KV_F16, KV_BF16
MAX_ROWS = 16  # rows of x per lc_linear call; larger products (prefill chunks) are GEMMs: MKL's job


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `linear` takes this call: a few fp32 rows on CPU, no autograd, plain contiguous tensors."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and weight.is_contiguous()
        and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias -> (..., N). The caller checks `linear_ok` first."""
    x = x.contiguous()
    N, K = weight.shape
    M = x.numel() // K
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    library().lc_linear(
        x.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), M, N, K, torch.get_num_threads()
    )
    return y


def attention_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `decode_attention` takes this call: one fp32 query per head on CPU; keys and values fp32,
    fp16 or bf16 in the cache's layout (rows of hd contiguous values, same strides for k and v)."""
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
) -> torch.Tensor:
    """q (B, H, 1, hd) over k/v (B, K, S, hd) -> (B, H, 1, hd). The query sits after the last key (a decode
    step: every key is visible). starts (B,): the first visible key of each row (leading padding);
    alibi_slopes (H,): ALiBi bias -slope * distance. The caller checks `attention_ok` first."""
    B, H, _, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q = q.contiguous()
    out = torch.empty_like(q)
    work = torch.empty(B * H * S, dtype=torch.float32)
    if starts is not None:
        starts = starts.to(torch.int64).contiguous()
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(torch.float32).contiguous()
    library().lc_decode_attention(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        work.data_ptr(),
        B,
        Hkv,
        H // Hkv,
        S,
        hd,
        k.stride(0),
        k.stride(1),
        KINDS[k.dtype],
        _ptr(starts),
        _ptr(alibi_slopes),
        hd**-0.5 if scale is None else scale,
        torch.get_num_threads(),
    )
    return out
