"""FlashAttention on CPU for training and prefill: the kernels of `longctx/kernels/flash_attention.c` as a
torch op (`torch.ops.longctx.flash_attention_cpu`, and `flash_attention_bf16` on bf16 q, k, v) with its own
backward.

A real op, not a Python autograd.Function around ctypes, so that tools working at the op level see it:
selective activation checkpointing keeps its outputs like those of torch's own attention kernels
(`longctx.train.memory`), and `torch.compile` treats it as one opaque call. The op returns the output and
each row's logsumexp; the backward recomputes the probabilities from them (memory O(L d)).

What it takes (`supports`): fp32 tensors on CPU, head dim a multiple of 16, causal or not, a query offset
(queries after cached keys: no mask tensor needed), grouped-query attention; no ALiBi, no dropout. The
backend falls back to torch's SDPA otherwise, and everywhere when the native kernels are unavailable.

bf16/fp16 q, k, v take the same kernels on upcast fp32 copies (`supports_upcast`) when no gradient is
needed and the CPU would emulate them (`longctx.device.cpu_emulates`): there torch's SDPA runs
half precision emulated, ~2x slower than these kernels on the fp32 copies (a bf16 prefill of SmolLM2 at
2048 tokens, AMD EPYC: 2.1 s of SDPA against 1.1 s); the copies cost one pass over q, k and v. Half-precision
training takes them too on a CPU without AMX (the copies are differentiable casts; numbers in
`supports_upcast`). Where the build has AVX512-BF16 (and the CPU no AMX), bf16 inference and training run
the bf16 kernels instead, forward and backward (`supports_bf16`): half the bytes saved per block, no copies.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from longctx.attention.sdpa import sdpa_attention
from longctx.device import cpu_emulates, cpu_flags
from longctx.kernels import available, has, library

# `auto` picks this backend from this many queries: causal fwd+bwd, 8 heads of 64, 2 threads, ours/torch's
# time 1.80 at 16 tokens, 1.21 at 64, 0.95 at 128, 0.75 at 256, 0.60 at 512 (a call costs ~0.2 ms of
# ctypes and packing); decode steps have their own kernel (longctx.infer.native)
MIN_QUERIES = 128


def supports(q: Tensor, k: Tensor, v: Tensor, *, alibi_slopes=None, dropout_p: float = 0.0) -> bool:
    return q.dtype == torch.float32 and _layout_ok(q, k, v, alibi_slopes, dropout_p)


def supports_upcast(q: Tensor, k: Tensor, v: Tensor, *, alibi_slopes=None, dropout_p: float = 0.0) -> bool:
    """Half precision on upcast fp32 copies: inference on a CPU that emulates it, and half-precision
    training (autocast) on a CPU without AMX (bf16: without the bf16 kernels either), where torch's bf16
    flash kernels run slower than the fp32 ones
    here: causal forward + backward at 4096 tokens, 8 heads of 64, 2 threads, AMD EPYC Zen 4 (native bf16):
    torch's 0.56-0.66 s, these on copies 0.43-0.45 s. Not measured on an AMX CPU, which keeps torch's."""
    if not supports_on_copies(q, k, v, alibi_slopes=alibi_slopes, dropout_p=dropout_p):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return upcasts_half_training(q.dtype)
    return cpu_emulates(q.dtype)


def supports_on_copies(q: Tensor, k: Tensor, v: Tensor, *, alibi_slopes=None, dropout_p: float = 0.0) -> bool:
    """bf16/fp16 q, k, v that the fp32 kernels take once copied to fp32, whatever the CPU (callers decide
    whether copying pays: `supports_upcast`, the context methods' region passes)."""
    return q.dtype in (torch.bfloat16, torch.float16) and _layout_ok(q, k, v, alibi_slopes, dropout_p)


def upcasts_half_training(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether half-precision training's attention takes the fp32 kernels on copies here (no AMX, and for
    bf16 no bf16 kernels; see `supports_upcast`): its blocks then also save fp32 q, k, v and output, which
    the planner counts."""
    return not _has_amx() and available() and not (dtype == torch.bfloat16 and bf16_kernels())


def _has_amx() -> bool:
    """AMX CPUs keep torch's bf16 attention kernels (which use AMX tiles): ours were not measured there."""
    return "amx_bf16" in cpu_flags()


def bf16_kernels() -> bool:
    """Whether bf16 attention runs the bf16 kernels here: the loaded build has bf16 dot products
    (AVX512-BF16), the CPU runs bf16 natively (`cpu_emulates`: its timed check, for a VM that reports the
    flag) and has no AMX."""
    return (
        has("lc_flash_forward_bf16") and has("lc_flash_backward_bf16")
        and not cpu_emulates(torch.bfloat16) and not _has_amx()
    )  # fmt: skip


def supports_bf16(q: Tensor, k: Tensor, v: Tensor, *, alibi_slopes=None, dropout_p: float = 0.0) -> bool:
    """bf16 inference and training where `bf16_kernels`: the bf16 forward (SmolLM2's bf16 prefill at 4096 on
    Zen 4: attention 5.8 s in torch's bf16 kernel, ~3.2 s here) and backward."""
    return q.dtype == torch.bfloat16 and bf16_layout_ok(
        q, k, v, alibi_slopes=alibi_slopes, dropout_p=dropout_p
    )


def bf16_layout_ok(q: Tensor, k: Tensor, v: Tensor, *, alibi_slopes=None, dropout_p: float = 0.0) -> bool:
    """q, k, v (of one dtype, whichever) the bf16 kernels take, as they are or once rounded to bf16."""
    return q.shape[-1] % 32 == 0 and _layout_ok(q, k, v, alibi_slopes, dropout_p) and bf16_kernels()


def _layout_ok(q: Tensor, k: Tensor, v: Tensor, alibi_slopes, dropout_p: float) -> bool:
    hd = q.shape[-1]
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype
        and q.dim() == 4
        and k.shape == v.shape
        and k.shape[0] == q.shape[0]
        and k.shape[-1] == hd
        and hd % 16 == 0
        and q.shape[1] % k.shape[1] == 0
        and alibi_slopes is None
        and dropout_p == 0.0
        and available()
    )


def _strides(t: Tensor):
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


def _check(status: int, what: str, *tensors: Tensor) -> None:
    if status:
        size = sum(t.numel() for t in tensors) * 4 / 2**20
        raise MemoryError(
            f"cpu_flash attention {what}: out of memory for its work buffers (inputs {size:.0f} MiB); "
            "use a shorter sequence, more activation checkpointing, or attn_backend='chunked'"
        )


def _rows(t: Tensor) -> Tensor:
    """The kernels read each row of hd values contiguously; any other strides are passed as they are."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(fn: str, dtype: torch.dtype, q: Tensor, k: Tensor, v: Tensor, causal: bool, q_offset: int,
             scale: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, H, Lq, hd = q.shape
    out = torch.empty(B, Lq, H, hd, dtype=dtype).transpose(1, 2)
    lse = torch.empty(B, H, Lq)
    status = getattr(library(), fn)(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
        B, H, k.shape[1], Lq, k.shape[2], hd, _strides(q), _strides(k), _strides(v), _strides(out),
        q_offset, int(causal), scale, torch.get_num_threads(),
    )  # fmt: skip
    _check(status, "forward", q, k, v)
    return out, lse


def _backward_kernel(fn: str, grad_out, q, k, v, out, lse, causal, q_offset, scale) -> tuple[Tensor, ...]:
    grad_out, q, k, v, out = (_rows(t) for t in (grad_out, q, k, v, out))
    B, H, Lq, hd = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # strides as the inputs'
    status = getattr(library(), fn)(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), grad_out.data_ptr(),
        lse.contiguous().data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
        B, H, k.shape[1], Lq, k.shape[2], hd,
        _strides(q), _strides(k), _strides(v), _strides(out), _strides(grad_out),
        _strides(dq), _strides(dk), _strides(dv),
        q_offset, int(causal), scale, torch.get_num_threads(),
    )  # fmt: skip
    _check(status, "backward", q, k, v)
    return dq, dk, dv


@torch.library.custom_op("longctx::flash_attention_cpu", mutates_args=())
def flash_attention_cpu(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, q_offset: int, scale: float
) -> tuple[Tensor, Tensor]:
    """q (B, H, Lq, hd), k/v (B, Hk, Lk, hd) -> out (B, H, Lq, hd), logsumexp (B, H, Lq).

    Query i sits at key q_offset + i. `out` is a transposed view of a (B, Lq, H, hd) buffer, so the
    output projection's `transpose(1, 2).reshape(B, Lq, H * hd)` needs no copy."""
    return _forward("lc_flash_forward", torch.float32, q, k, v, causal, q_offset, scale)


@torch.library.custom_op("longctx::flash_attention_bf16", mutates_args=())
def flash_attention_bf16(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, q_offset: int, scale: float
) -> tuple[Tensor, Tensor]:
    """As `flash_attention_cpu` on bf16 q, k, v: out bf16 (same layout), logsumexp fp32."""
    return _forward("lc_flash_forward_bf16", torch.bfloat16, q, k, v, causal, q_offset, scale)


@torch.library.custom_op("longctx::flash_attention_cpu_backward", mutates_args=())
def flash_attention_cpu_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, q_offset: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return _backward_kernel("lc_flash_backward", grad_out, q, k, v, out, lse, causal, q_offset, scale)


@torch.library.custom_op("longctx::flash_attention_bf16_backward", mutates_args=())
def flash_attention_bf16_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, q_offset: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return _backward_kernel("lc_flash_backward_bf16", grad_out, q, k, v, out, lse, causal, q_offset, scale)


def _fake_forward(q, k, v, causal, q_offset, scale):
    B, H, Lq, hd = q.shape
    return q.new_empty(B, Lq, H, hd).transpose(1, 2), q.new_empty(B, H, Lq, dtype=torch.float32)


def _fake_backward(grad_out, q, k, v, out, lse, causal, q_offset, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, q_offset, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = causal, q_offset, scale


def _differentiable(forward, backward) -> None:
    def _backward(ctx, grad_out, grad_lse):
        # the logsumexp is an internal output (the backward's input), never differentiated through
        q, k, v, out, lse = ctx.saved_tensors
        return (*backward(grad_out, q, k, v, out, lse, *ctx.args), None, None, None)

    forward.register_fake(_fake_forward)
    backward.register_fake(_fake_backward)
    forward.register_autograd(_backward, setup_context=_setup_context)


_differentiable(flash_attention_cpu, flash_attention_cpu_backward)
_differentiable(flash_attention_bf16, flash_attention_bf16_backward)


def cpu_flash_attention(
    q, k, v, *, causal=True, q_offset=0, alibi_slopes=None, key_mask=None, scale=None, dropout_p=0.0,
    chunk_size=256,
) -> Tensor:  # fmt: skip
    """The backend (see longctx.attention.dispatch): the native kernels where `supports` (bf16 ones where
    `supports_bf16`; on fp32 copies where `supports_upcast`), else SDPA."""
    how = dict(alibi_slopes=alibi_slopes, dropout_p=dropout_p)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if key_mask is None and supports(q, k, v, **how):
        return flash_attention_cpu(q, k, v, causal, q_offset, scale)[0]
    if key_mask is None and supports_bf16(q, k, v, **how):
        return flash_attention_bf16(q, k, v, causal, q_offset, scale)[0]
    if key_mask is None and supports_upcast(q, k, v, **how):
        out = flash_attention_cpu(q.float(), k.float(), v.float(), causal, q_offset, scale)[0]
        return out.to(q.dtype)  # keeps the (B, Lq, H, hd) layout under the transposed view
    return sdpa_attention(
        q, k, v, causal=causal, q_offset=q_offset, alibi_slopes=alibi_slopes, key_mask=key_mask,
        scale=scale, dropout_p=dropout_p, chunk_size=chunk_size,
    )  # fmt: skip
