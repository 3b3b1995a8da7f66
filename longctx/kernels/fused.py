"""RMSNorm and SwiGLU through the one-pass kernels of `fused.c` for fp32 on CPU (bf16 too: SwiGLU for bf16
training's MLP under autocast, RMSNorm's forward for a bf16 model's inference), RoPE for training, and the
chunked loss's softmax step; torch's ops elsewhere.

The model calls `rms_norm` (its norms) and `swiglu` (its MLP). With autograd they run as torch ops with
their own backward (`torch.ops.longctx.rms_norm`, `torch.ops.longctx.swiglu`), so selective checkpointing
and `torch.compile` see ops, not opaque Python; without autograd (evaluation, prefill, decode steps) the
kernels are called directly, since an op's dispatch costs ~30 us and a decode step runs 17 norms.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor

from longctx.kernels import available, library

_SUFFIX = {torch.float32: "", torch.bfloat16: "_bf16"}  # the suffix of the fp32 and bf16 kernels


def _native(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


def _bf16_native(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors) and available()


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _rms_norm_forward(x: Tensor, weight: Tensor, eps: float, keep_rstd: bool) -> tuple[Tensor, Tensor]:
    x, weight = x.contiguous(), weight.contiguous()
    D = x.shape[-1]
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1]) if keep_rstd else None
    getattr(library(), "lc_rms_norm_fwd" + _SUFFIX[x.dtype])(
        x.data_ptr(), weight.data_ptr(), y.data_ptr(), None if rstd is None else rstd.data_ptr(),
        x.numel() // D, D, eps, torch.get_num_threads(),
    )  # fmt: skip
    return y, rstd


@torch.library.custom_op("longctx::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x (..., D), weight (D,) -> y (..., D), rstd (...) (1 / rms per row, kept for the backward)."""
    return _rms_norm_forward(x, weight, eps, keep_rstd=True)


@rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1])


@torch.library.custom_op("longctx::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    grad_y, x, weight = grad_y.contiguous(), x.contiguous(), weight.contiguous()
    D = x.shape[-1]
    dx, dw = torch.empty_like(x), torch.empty_like(weight)
    library().lc_rms_norm_bwd(
        x.data_ptr(), weight.data_ptr(), rstd.contiguous().data_ptr(), grad_y.data_ptr(), dx.data_ptr(),
        dw.data_ptr(), x.numel() // D, D, torch.get_num_threads(),
    )  # fmt: skip
    return dx, dw


@rms_norm_backward_op.register_fake
def _(grad_y, x, weight, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, grad_y, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_backward_op(grad_y, x, weight, rstd)
    return dx, dw, None


rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float | None = None) -> Tensor:
    """F.rms_norm over the last dim (`eps=None`: the dtype's epsilon, as nn.RMSNorm)."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if weight is None or x.numel() == 0:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    if _native(x, weight):
        if _needs_grad(x, weight):
            return rms_norm_op(x, weight, eps)[0]
        return _rms_norm_forward(x, weight, eps, keep_rstd=False)[0]
    if _bf16_native(x, weight) and not _needs_grad(x, weight):  # a bf16 model's norms (prefill, decode)
        return _rms_norm_forward(x, weight, eps, keep_rstd=False)[0]
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def _swiglu_native(gate: Tensor, up: Tensor) -> bool:
    """fp32 or bf16 (bf16 training under autocast: the linears' outputs), on CPU, with the kernels."""
    return gate.device.type == "cpu" and gate.dtype == up.dtype and gate.dtype in _SUFFIX and available()


def _swiglu_forward(gate: Tensor, up: Tensor) -> Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    h = torch.empty_like(gate)
    fn = getattr(library(), "lc_swiglu_fwd" + _SUFFIX[gate.dtype])
    fn(gate.data_ptr(), up.data_ptr(), h.data_ptr(), h.numel(), torch.get_num_threads())
    return h


@torch.library.custom_op("longctx::swiglu", mutates_args=())
def swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, same shapes."""
    return _swiglu_forward(gate, up)


@swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("longctx::swiglu_backward", mutates_args=())
def swiglu_backward_op(grad_h: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    grad_h, gate, up = grad_h.to(gate.dtype).contiguous(), gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    getattr(library(), "lc_swiglu_bwd" + _SUFFIX[gate.dtype])(
        gate.data_ptr(), up.data_ptr(), grad_h.data_ptr(), dg.data_ptr(), du.data_ptr(), gate.numel(),
        torch.get_num_threads(),
    )  # fmt: skip
    return dg, du


@swiglu_backward_op.register_fake
def _(grad_h, gate, up):
    return (
        torch.empty_like(gate, memory_format=torch.contiguous_format),
        torch.empty_like(up, memory_format=torch.contiguous_format),
    )


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # gate and up: torch's silu-then-mul keeps silu(gate) as well


def _swiglu_backward(ctx, grad_h):
    return swiglu_backward_op(grad_h, *ctx.saved_tensors)


swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up: the SwiGLU MLP's activation."""
    if gate.shape != up.shape or not _swiglu_native(gate, up) or gate.numel() == 0:
        return F.silu(gate) * up
    if _needs_grad(gate, up):
        return swiglu_op(gate, up)
    return _swiglu_forward(gate, up)


def _rope_call(x: Tensor, cos: Tensor, sin: Tensor, transpose: bool) -> Tensor:
    B, H, T, hd = x.shape
    y = torch.empty_like(x)  # x's layout (q, k are transposed views of the projections)
    cos, sin = cos.contiguous(), sin.contiguous()
    getattr(library(), "lc_rope" + _SUFFIX[x.dtype])(
        x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), B, H, T, hd, cos.shape[-1],
        (ctypes.c_int64 * 3)(*x.stride()[:3]), (ctypes.c_int64 * 3)(*y.stride()[:3]),
        0 if cos.shape[0] == 1 else cos.stride(0), int(transpose), torch.get_num_threads(),
    )  # fmt: skip
    return y


@torch.library.custom_op("longctx::rope", mutates_args=())
def rope_op(x: Tensor, cos: Tensor, sin: Tensor, transpose: bool) -> Tensor:
    """x (B, H, T, hd), cos/sin fp32 (B or 1, T, rd) -> x cos + rotate_half(x) sin on the first rd dims
    (`transpose`: the transposed map, the backward's)."""
    return _rope_call(x, cos, sin, transpose)


@rope_op.register_fake
def _(x, cos, sin, transpose):
    return torch.empty_like(x)


def _rope_setup(ctx, inputs, output):
    _, cos, sin, transpose = inputs
    ctx.save_for_backward(cos, sin)
    ctx.transpose = transpose


def _rope_backward(ctx, grad_y):
    cos, sin = ctx.saved_tensors
    return (
        rope_op(grad_y.contiguous() if grad_y.stride(-1) != 1 else grad_y, cos, sin, not ctx.transpose),
        None,
        None,
        None,
    )


rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


def rope_runs(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether `rope` takes these: a training forward (a gradient to form; inference keeps torch's ops, whose
    fp32 rounding transformers shares) of fp32 or bf16 x (B, H, T, hd) with rows contiguous on CPU, and fp32
    cos/sin (B or 1, T, rd), rd even, that need no gradient."""
    return (
        x.device.type == "cpu"
        and x.dtype in _SUFFIX
        and x.dim() == 4
        and x.stride(-1) == 1
        and _needs_grad(x)
        and cos.dtype == sin.dtype == torch.float32
        and cos.shape == sin.shape
        and cos.dim() == 3
        and cos.shape[0] in (1, x.shape[0])
        and cos.shape[1] == x.shape[2]
        and cos.shape[2] % 2 == 0
        and cos.shape[2] <= x.shape[3]
        and not (cos.requires_grad or sin.requires_grad)
        and available()
    )


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in HF's half-split layout: x cos + rotate_half(x) sin on the first rd dims of x (B, H, T, hd), the
    rest passed through, with cos/sin (B or 1, T, rd) fp32, in one pass (`rope_runs`: what it takes)."""
    return rope_op(x, cos, sin, False)


def softmax_xent_runs(logits: Tensor) -> bool:
    """Whether `softmax_xent_` takes these logits: fp32 or bf16, contiguous, on CPU, with the kernels."""
    return logits.device.type == "cpu" and logits.dtype in _SUFFIX and logits.is_contiguous() and available()


def softmax_xent_(logits: Tensor, labels: Tensor) -> Tensor | None:
    """In place, for the chunked loss: logits (n, V) -> softmax - onehot(labels), each rounded once to their
    dtype, zero rows where a label is negative (ignored); returns nll (n,) fp32 (lse minus the label's
    logit, 0 where ignored). None where the kernel cannot take them (`softmax_xent_runs`): the caller's
    torch ops then. Labels must lie in [0, V) or be negative (the caller checks: the kernel indexes with them)."""
    if not softmax_xent_runs(logits):
        return None
    labels = labels.to(torch.int64).contiguous()
    nll = torch.empty(logits.shape[0], dtype=torch.float32)
    fn = getattr(library(), "lc_softmax_xent" + _SUFFIX[logits.dtype])
    if fn(logits.data_ptr(), labels.data_ptr(), nll.data_ptr(), *logits.shape, torch.get_num_threads()):
        raise MemoryError(f"the loss kernel could not allocate a row of {logits.shape[1]} floats")
    return nll
