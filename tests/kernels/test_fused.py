"""The fused RMSNorm, SwiGLU and RoPE kernels (longctx/kernels/fused.c) against float64 references computed
with torch's own ops, forward and backward, through the torch op (autograd) and the direct call (no grad);
the chunked loss's softmax step against float64's log-softmax."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from longctx import kernels
from longctx.kernels import fused

needs_native = pytest.mark.skipif(not kernels.available(), reason=f"{kernels.unavailable_reason()}")


def _rms_reference(x, w, eps):
    x, w = x.double(), w.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@needs_native
@pytest.mark.parametrize("shape", [(3, 8), (1, 13), (2, 100, 96), (70, 512)])  # 70 rows: the threaded path
def test_rms_norm_forward_and_backward_match_float64(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).requires_grad_()
    w = (torch.rand(shape[-1], generator=g) + 0.5).requires_grad_()
    dy = torch.randn(*shape, generator=g)
    y = fused.rms_norm(x, w, 1e-5)
    ref = _rms_reference(x, w, 1e-5)
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(y, (x, w), dy)
    ref_grads = torch.autograd.grad(ref, (x, w), dy.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the direct call (evaluation, decode steps): same numbers
        torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), y.detach(), rtol=0, atol=0)


@needs_native
# the scalar tail, 8 wide, 16 wide then 8 then scalar (AVX-512 builds), the 4096-element work items
@pytest.mark.parametrize("n", [7, 8, 25, 1000, 3 * 4096 + 5])
def test_swiglu_forward_and_backward_match_float64(n):
    g = torch.Generator().manual_seed(n)
    a = (torch.randn(n, generator=g) * 4).requires_grad_()
    b = torch.randn(n, generator=g).requires_grad_()
    with torch.no_grad():  # the sigmoid's both branches far out: no overflow, no NaN
        a[:2] = torch.tensor([-100.0, 100.0])
    dh = torch.randn(n, generator=g)
    h = fused.swiglu(a, b)
    ref = F.silu(a.double()) * b.double()
    torch.testing.assert_close(h.double(), ref, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(h, (a, b), dh)
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref_grads = torch.autograd.grad(F.silu(ad) * bd, (ad, bd), dh.double())
    for x, y in zip(grads, ref_grads):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(fused.swiglu(a, b), h.detach(), rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("n", [7, 8, 25, 1000, 3 * 4096 + 5])
def test_bf16_swiglu_rounds_once_from_float64(n):
    """bf16 gate, up and gradient (bf16 training's MLP): computed in fp32, each output rounded to bf16 once,
    so within u = 2^-8 of float64 on the same bf16 inputs (relative, plus fp32's ~1e-6); torch's bf16
    silu-then-mul rounds twice and is the looser of the two."""
    g = torch.Generator().manual_seed(n)
    a = (torch.randn(n, generator=g) * 4).bfloat16().requires_grad_()
    b = torch.randn(n, generator=g).bfloat16().requires_grad_()
    with torch.no_grad():
        a[:3] = torch.tensor([-100.0, 100.0, float("nan")])
    dh = torch.randn(n, generator=g).bfloat16()
    h = fused.swiglu(a, b)
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = F.silu(ad) * bd
    ref_grads = torch.autograd.grad(ref, (ad, bd), dh.double())
    grads = torch.autograd.grad(h, (a, b), dh)
    for got, want in ((h, ref), *zip(grads, ref_grads)):
        assert got.dtype == torch.bfloat16
        assert got[2].isnan()  # a NaN stays a NaN (not rounded into an infinity)
        got, want = got[3:].double(), want[3:].detach()
        assert ((got - want).abs() <= 2**-8 * want.abs() + 1e-6).all()
    assert not h.isinf().any()
    with torch.no_grad():  # the direct call: same numbers
        assert torch.equal(fused.swiglu(a, b)[3:], h.detach()[3:])
    torch.library.opcheck(fused.swiglu_op, (a.detach()[3:].requires_grad_(), b.detach()[3:].requires_grad_()))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,V", [(1, 8), (5, 1003), (70, 4096)])  # a tail past the 8-wide loop; threads
def test_softmax_xent_matches_float64(dtype, n, V):
    """nll = logsumexp(z) - z[label] and z overwritten by softmax(z) - onehot, rounded once to z's dtype,
    against float64 on the same logits. In fp32 each softmax value p carries exp's and the division's
    roundings and the sum's (V / 8 terms per 8-wide lane: at most (V / 8) 2^-24 relative), then one rounding
    of p - onehot to the output dtype (2^-24 fp32, 2^-8 bf16); ignored rows (negative labels) give 0 and
    zeros."""
    g = torch.Generator().manual_seed(n + V)
    z = (torch.randn(n, V, generator=g) * 4).to(dtype)
    y = torch.randint(0, V, (n,), generator=g)
    y[1::3] = -100
    ref = z.double().log_softmax(-1)
    keep = y >= 0
    want_nll = torch.where(keep, -ref.gather(1, y.clamp_min(0)[:, None]).squeeze(1), 0.0)
    want = (ref.exp() - F.one_hot(y.clamp_min(0), V).double()) * keep[:, None]
    got = z.clone()
    nll = fused.softmax_xent_(got, y)
    assert nll.dtype == torch.float32 and got.dtype == dtype
    torch.testing.assert_close(nll.double(), want_nll, rtol=1e-6, atol=1e-5)
    rel = (V / 8 + 8) * 2.0**-24
    out = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    p = ref.exp() * keep[:, None]
    assert ((got.double() - want).abs() <= rel * p + out * want.abs()).all()
    assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_xent_keeps_nan_and_infinity_visible(dtype):
    """A row holding NaN or an infinity gives a NaN loss and NaN gradients (as torch's log-softmax of it
    would): the trainer's finite-loss check sees it."""
    z = torch.randn(3, 40).to(dtype)
    z[0, 5], z[1, 9] = float("nan"), float("inf")
    nll = fused.softmax_xent_(z, torch.tensor([1, 2, 3]))
    assert nll[:2].isnan().all() and z[:2].isnan().all() and nll[2].isfinite() and z[2].isfinite().all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rd,batch_cos", [(64, 2), (32, 1), (18, 2)]
)  # full, partial with shared tables, a tail
def test_rope_matches_float64_forward_and_backward(dtype, rd, batch_cos):
    """Training's RoPE (`apply_rotary` with a gradient to form) on q laid out as the projection's transposed
    view: x cos + rotate_half(x) sin on the first rd dims (any cos/sin, not only HF's repeated halves), the
    rest passed through, and its gradient, against float64 on the same inputs: fp32 within fp32 rounding,
    bf16 within one rounding (2^-8 relative); the output keeps x's layout."""
    from longctx.positions.rope import apply_rotary, rotate_half

    g = torch.Generator().manual_seed(rd)
    B, H, T, hd = 2, 3, 70, 64  # 420 rows: the threaded path
    x = torch.randn(B, T, H, hd, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    ang = torch.rand(batch_cos, T, rd, generator=g, dtype=torch.float64) * 6
    cos, sin = ang.cos(), ang.sin()
    y = apply_rotary(x, cos.float(), sin.float())
    assert y.dtype == dtype and y.stride() == x.stride()
    xd = x.detach().double().requires_grad_()
    c, s = cos.float().double()[:, None], sin.float().double()[:, None]
    ref = torch.cat([xd[..., :rd] * c + rotate_half(xd[..., :rd]) * s, xd[..., rd:]], dim=-1)
    up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (y.double() * up.to(dtype).double()).sum().backward()
    (ref * up.to(dtype).double()).sum().backward()
    for got, want in ((y.detach().double(), ref.detach()), (x.grad.double(), xd.grad)):
        bound = (2**-8 if dtype == torch.bfloat16 else 1e-6) * want.abs() + 1e-6
        assert ((got - want).abs() <= bound).all()
    assert torch.equal(y.detach()[..., rd:], x.detach()[..., rd:])
    with torch.no_grad():  # inference keeps torch's ops (transformers' fp32 rounding)
        assert not fused.rope_runs(x, cos.float(), sin.float())


@needs_native
def test_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration, checked by torch itself."""
    x, w = torch.randn(5, 24, requires_grad=True), torch.rand(24, requires_grad=True)
    torch.library.opcheck(fused.rms_norm_op, (x, w, 1e-6))
    a, b = torch.randn(4, 40, requires_grad=True), torch.randn(4, 40, requires_grad=True)
    torch.library.opcheck(fused.swiglu_op, (a, b))
    q, cs = torch.randn(1, 2, 5, 32, requires_grad=True), torch.rand(2, 1, 5, 32)
    torch.library.opcheck(fused.rope_op, (q, cs[0], cs[1], False))


def test_other_dtypes_and_no_weight_use_torch():
    x, w = torch.randn(4, 32, dtype=torch.bfloat16), torch.rand(32, dtype=torch.bfloat16)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-6), F.rms_norm(x, (32,), w, 1e-6))
    x = torch.randn(4, 32)
    torch.testing.assert_close(fused.rms_norm(x, None, 1e-6), F.rms_norm(x, (32,), None, 1e-6))
    torch.testing.assert_close(fused.swiglu(x.half(), x.half()), F.silu(x.half()) * x.half())


def test_turned_off_by_environment():
    code = "from longctx import kernels; print(kernels.available(), kernels.unavailable_reason())"
    env = {**os.environ, "LONGCTX_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False turned off by LONGCTX_NATIVE=0"


@needs_native
@pytest.mark.parametrize("shape", [(3, 8), (1, 13), (70, 576)])  # a scalar tail; 70 rows: the threaded path
def test_bf16_rms_norm_forward_rounds_once_from_float64(shape):
    """A bf16 model's norm without autograd (prefill, decode): computed in fp32, y rounded to bf16 once, so
    within u = 2^-8 of float64 on the same bf16 x and w (relative, plus fp32's ~1e-6)."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).bfloat16()
    w = (torch.rand(shape[-1], generator=g) + 0.5).bfloat16()
    with torch.no_grad():
        y = fused.rms_norm(x, w, 1e-5)
    want = _rms_reference(x, w, 1e-5)
    assert y.dtype == torch.bfloat16
    assert ((y.double() - want).abs() <= 2**-8 * want.abs() + 1e-6).all()
    assert fused.rms_norm(x.requires_grad_(), w, 1e-5).requires_grad  # with autograd: torch's op
