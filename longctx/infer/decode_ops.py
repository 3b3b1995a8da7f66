"""The small ops of a decode step on CPU, routed to kernels that run at memory speed.

A decode step multiplies one token's activations by every weight matrix: matrix-vector products, bound by
how fast the weights stream from memory. torch's CPU wheel sends `F.linear` to MKL, whose fp32
matrix-vector kernel reads weights at ~14 GB/s on a 2-core AMD EPYC (one core, whatever the thread
count); oneDNN (`torch.ops.mkldnn._linear_pointwise`, the kernel inductor uses for frozen CPU linears)
reads the same plain weight at ~21 GB/s, and the AVX2 loop of `longctx.infer.native` at ~37 GB/s (the
machine's read bandwidth is ~39 GB/s). Same weights, no copy, no packing; results differ from MKL only by
float summation order. (The model's RMSNorm routes itself: `longctx.kernels.fused.rms_norm` calls its
kernel directly when no gradient is needed, ~3 us for one row against torch's ~20 us of dispatch.)

`install(model)` routes every `nn.Linear` of a model through `linear` (a forward set on the instance, as
activation checkpointing does: names and state_dict unchanged). It takes a fast path only where it pays
and is safe — CPU, float32, at most `MAX_ROWS` rows, no gradient needed — and is torch's op otherwise, so
an installed model trains and runs on GPU exactly as before. The order of preference: the native kernel,
else oneDNN, else torch.

A bf16 or fp16 model on a CPU without native bf16 (`longctx.device.cpu_emulates`: AVX2-only AMD EPYC,
say) has one more route: torch runs its many-row products (prefill chunks, perplexity windows) on emulated
half-precision arithmetic, ~90x slower than its fp32 GEMM on that CPU (measured in `longctx.device`'s check:
0.011x), so they upcast x and the weight to fp32, multiply there and round the result back: the same numbers
as a half-precision GEMM that accumulates in fp32, at fp32 speed. Decode steps keep the native half kernels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from longctx.device import cpu_emulates
from longctx.infer import native

MAX_ROWS = native.MAX_ROWS
_ONEDNN = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
)


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        _ONEDNN is not None
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and weight.dim() == 2
        and weight.is_contiguous()
        and not x.is_mkldnn
    )


def _upcast_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and (bias is None or bias.dtype == x.dtype)
        and x.numel() > MAX_ROWS * x.shape[-1]
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and cpu_emulates(x.dtype)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the native kernel or oneDNN for a few fp32 rows on CPU without autograd, or on
    fp32 arithmetic for many half-precision rows where the CPU would emulate them (see the module's
    docstring). x: (..., d) -> (..., out)."""
    if native.linear_ok(x, weight, bias):
        return native.linear(x, weight, bias)
    if _onednn_ok(x, weight, bias):
        return _ONEDNN(x, weight, bias, "none", [], "")
    if _upcast_ok(x, weight, bias):
        b = None if bias is None else bias.float()
        return F.linear(x.float(), weight.float(), b).to(x.dtype)
    return F.linear(x, weight, bias)


def head_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The LM head of a generation step, `linear` except that a 16-bit model's logits stay the native
    kernel's fp32 sums rather than being rounded to the weights' dtype again: one bf16 ulp is 0.125 at
    logits of 16-32, so a greedy pick between two tokens 0.11 apart (SmolLM2 bf16, 4096-token prompt) was a
    tie that the kernel's summation order broke either way. x: (B, d) -> (B, V)."""
    if weight.dtype in (torch.bfloat16, torch.float16) and native.linear_ok(x.float(), weight, None):
        return native.linear(x.float(), weight)
    return linear(x, weight)


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias)


def install(model: nn.Module) -> nn.Module:
    """Route `model`'s plain nn.Linear layers through the decode kernels (idempotent)."""
    if getattr(model, "_longctx_decode_ops", False):
        return model
    for module in model.modules():
        # exact types: not LoRA or quantised subclasses, which have their own forward
        if type(module) is nn.Linear:
            module.forward = functools.partial(_linear_forward, module)
    model._longctx_decode_ops = True
    return model
