"""The decode step's matrix-vector kernels (`longctx/kernels/decode.c` for fp32 weights, `lc_linear_16` of
`decode_step.c` for bf16/fp16 ones: the LM head of a 16-bit model), behind a check of whether they take
the call (the one-query attention kernel is the attention backend `longctx.attention.cpu_decode`).

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

__all__ = ["available", "unavailable_reason", "linear_ok", "linear"]
MAX_ROWS = 16  # rows of x per lc_linear call; larger products (prefill chunks) are GEMMs: MKL's job


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_HALF = {torch.float16: 0, torch.bfloat16: 1}  # lc_linear_16's bf16 flag


def linear_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `linear` takes this call: a few rows on CPU, no autograd, plain contiguous tensors; fp32
    weights with fp32 x, or 16-bit weights (widened in registers) with x in their dtype or fp32."""
    return (
        x.device.type == "cpu"
        and (
            x.dtype == weight.dtype == torch.float32
            or (weight.dtype in _HALF and x.dtype in (weight.dtype, torch.float32))
        )
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and weight.is_contiguous()
        and (bias is None or (bias.dtype in (torch.float32, weight.dtype) and bias.is_contiguous()))
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias -> (..., N) in x's dtype, accumulated in fp32 (for 16-bit x the
    result is rounded once at the end, as torch's half-precision GEMM does). The caller checks `linear_ok`."""
    xf = x.float().contiguous()
    N, K = weight.shape
    M = x.numel() // K
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    nt = torch.get_num_threads()
    if weight.dtype == torch.float32:
        library().lc_linear(xf.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), M, N, K, nt)
    else:
        b = None if bias is None else bias.float().contiguous()
        library().lc_linear_16(
            xf.data_ptr(), weight.data_ptr(), _HALF[weight.dtype], _ptr(b), y.data_ptr(), M, N, K, nt
        )
    return y.to(x.dtype)
