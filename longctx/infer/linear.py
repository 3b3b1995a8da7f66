"""Matrix-vector products for decoding on CPU: oneDNN instead of MKL.

A decode step multiplies one token's activations by every weight matrix: a matrix-vector product, bound
by how fast the weights stream from memory. torch's CPU wheel sends `F.linear` to MKL, whose fp32
matrix-vector kernel reads weights at ~14 GB/s on a 2-core AMD EPYC (one core, whatever the thread
count), while the same call through oneDNN (`torch.ops.mkldnn._linear_pointwise`, the kernel inductor
uses for frozen CPU linears) reads the plain, unpacked weight at 20-34 GB/s — the machine's read bandwidth
is ~39 GB/s (measured by `bench/generate_vs_hf.py --micro`). Same weights, no copy, no packing; results
differ from MKL only by float summation order.

`install(model)` routes every `nn.Linear` of a model through `linear` (a forward set on the instance, as
activation checkpointing does: names and state_dict unchanged). `linear` takes oneDNN only where it pays
and is safe — CPU, float32, at most `MAX_ROWS` rows, no gradient needed — and is `F.linear` otherwise, so
an installed model trains and runs on GPU exactly as before.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 16  # oneDNN's matrix-vector path; larger products (prefill chunks) stay on MKL's GEMM
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN for a few fp32 rows on CPU without autograd. x: (..., d) -> (..., out)."""
    if _onednn_ok(x, weight, bias):
        return _ONEDNN(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias)


def install(model: nn.Module) -> nn.Module:
    """Route `model`'s plain nn.Linear layers through `linear` (idempotent; returns the model)."""
    if _ONEDNN is None or getattr(model, "_longctx_decode_linear", False):
        return model
    for module in model.modules():
        if type(module) is nn.Linear:  # not LoRA or quantised subclasses, which have their own forward
            module.forward = functools.partial(_forward, module)
    model._longctx_decode_linear = True
    return model
