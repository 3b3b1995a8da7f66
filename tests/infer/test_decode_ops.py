"""Decode ops (native kernels, else oneDNN): the same numbers as the torch ops (to fp32 rounding), used only
where safe, installed on a model without changing its names or its greedy tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longctx import device
from longctx.config import GPTConfig
from longctx.infer import decode_ops, native
from longctx.model import GPT

needs_onednn = pytest.mark.skipif(decode_ops._ONEDNN is None, reason="torch built without oneDNN")
needs_fast_path = pytest.mark.skipif(
    decode_ops._ONEDNN is None and not native.available(), reason="neither oneDNN nor native kernels"
)


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 96), (3, 1, 96), (2, 5, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(200, 96, generator=g)
    b = torch.randn(200, generator=g) if bias else None
    with torch.no_grad():
        assert decode_ops._onednn_ok(x, w, b)
        out = decode_ops.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())  # float64 reference
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_linear_falls_back_where_onednn_does_not_apply():
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(2, 4)
    assert not decode_ops._onednn_ok(x, w, None)  # a gradient is needed: autograd must see F.linear
    y = decode_ops.linear(x, w)
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(8, 4))
    with torch.no_grad():
        assert not decode_ops._onednn_ok(torch.randn(64, 4), w, None)  # many rows: MKL's GEMM
        assert not decode_ops._onednn_ok(x.double(), w.double(), None)  # not float32
        assert not decode_ops._onednn_ok(x, w.detach().t().contiguous().t(), None)  # strided weight


@needs_fast_path
def test_install_keeps_names_and_generation():
    from longctx.infer.engine import generate_tokens

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", init_std=0.05)).eval()
    prompt = torch.randint(0, 260, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    names = list(model.state_dict())
    with torch.no_grad():
        ids = torch.tensor([prompt])
        ref_logits = model(ids)
    decode_ops.install(model)
    decode_ops.install(model)  # idempotent
    assert list(model.state_dict()) == names
    assert model._longctx_decode_ops and "forward" in vars(model.blocks[0].attn.q_proj)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref_logits)  # prefill-sized calls: unchanged path
        one = model(ids[:, :1])  # one row per linear: the native or oneDNN path
    torch.testing.assert_close(one, ref_logits[:, :1], rtol=1e-5, atol=1e-5)
    tokens = generate_tokens(model, prompt, 16)
    plain = GPT(model.config).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        ids = torch.tensor([prompt])
        for _ in range(16):  # greedy by full recomputation, F.linear everywhere
            ids = torch.cat([ids, plain(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert tokens == ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_upcast_linear_is_a_half_gemm_accumulated_in_fp32(monkeypatch, dtype, bias):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 96, generator=g).to(dtype)  # 120 rows: a prefill chunk, not a decode step
    w = torch.randn(200, 96, generator=g).to(dtype)
    b = torch.randn(200, generator=g).to(dtype) if bias else None
    with torch.no_grad():
        assert decode_ops._upcast_ok(x, w, b)
        out = decode_ops.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())  # the exact product
    assert out.shape == ref.shape and out.dtype == dtype
    # one rounding to the half type (its unit roundoff: bf16 2^-8, fp16 2^-11) above fp32 summation error
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    torch.testing.assert_close(out.double(), ref, rtol=u, atol=1e-3)
    assert (out.double() - ref).abs().max() <= (ref.to(dtype).double() - ref).abs().max() * 2 + 1e-3


def test_upcast_applies_only_to_many_half_rows_without_autograd_where_bf16_is_emulated(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    w = torch.randn(8, 32, dtype=torch.bfloat16)
    many = torch.randn(64, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert decode_ops._upcast_ok(many, w, None)
        assert not decode_ops._upcast_ok(many[:2], w, None)  # a decode step: the native half kernels
        assert not decode_ops._upcast_ok(many.float(), w.float(), None)  # fp32 already
        assert not decode_ops._upcast_ok(many.float(), w, None)  # mixed dtypes: torch's own error
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
        assert not decode_ops._upcast_ok(many, w, None)  # a CPU with native bf16: torch's kernels
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    w.requires_grad_(True)
    assert not decode_ops._upcast_ok(many, w, None)  # training: autograd must see F.linear


def test_installed_half_model_prefills_within_bf16_rounding_of_float64(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    half = decode_ops.install(GPT(GPTConfig.from_preset("tiny", init_std=0.05)).to(torch.bfloat16).eval())
    ids = torch.randint(0, 260, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = half(ids)  # 48 rows per linear: the upcast route
        ref = GPT(half.config).eval()
        ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
        exact = ref.double()(ids)  # the same bf16 weights, float64 arithmetic
    assert logits.dtype == torch.bfloat16
    # bf16 activations round at every layer: the logits stay within a few bf16 steps of the exact ones
    assert (logits.double() - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_logits_of_a_half_model_are_its_fp32_sums(dtype):
    """A 16-bit model's logits are the fp32 sums of its weights times its (16-bit) hidden state, not rounded
    to the weights' dtype again: within fp32 accumulation of float64, where the plain linear is a 16-bit
    rounding away (up to an ulp, 0.125 at logits of 16-32)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 96, generator=g) * 3).to(dtype)
    w = torch.randn(300, 96, generator=g).to(dtype)
    with torch.no_grad():
        got, rounded = decode_ops.head_logits(x, w), decode_ops.linear(x, w)
    want = x.double() @ w.double().T
    assert got.dtype == torch.float32 and rounded.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(got.to(dtype), rounded)  # the same sums, rounded once more
