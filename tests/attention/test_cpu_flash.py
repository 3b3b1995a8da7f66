"""The native CPU FlashAttention op (longctx/kernels/flash_attention.c) against a float64 reference and
torch's SDPA: outputs and gradients over ragged blocks, grouped-query heads, query offsets and the model's
strided (B, T, H, hd) layouts; its registration as a torch op; when `auto` picks it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longctx import GPT, GPTConfig, device
from longctx.attention import attention, cpu_flash
from longctx.positions.alibi import alibi_slopes
from longctx.train.loss import lm_loss
from tests.attention.test_attention_backends import reference

pytestmark = pytest.mark.skipif(
    not cpu_flash.available(), reason="no native kernels (longctx.kernels.unavailable_reason())"
)


def _qkv(B, H, Hk, Lq, Lk, hd, strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # the model's layout: views of (B, T, heads, hd), rows H * hd apart
        q = torch.randn(B, Lq, H, hd, generator=g).transpose(1, 2)
        k, v = (torch.randn(B, Lk, Hk, hd, generator=g).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(B, H, Lq, hd, generator=g)
        k, v = (torch.randn(B, Hk, Lk, hd, generator=g) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize(
    "B,H,Hk,Lq,Lk,hd,causal,q_offset",
    [
        (1, 2, 2, 300, 300, 64, True, 0),  # 96-blocks: 3 full, 1 ragged
        (2, 4, 2, 200, 200, 64, True, 0),  # grouped-query heads
        (1, 3, 3, 97, 130, 32, True, 33),  # queries after 33 cached keys (rows that see no key of a block)
        (1, 2, 1, 50, 77, 128, False, 0),  # no mask, more keys than queries
        (1, 1, 1, 5, 5, 16, True, 0),  # smaller than one block
        (1, 2, 2, 96, 96, 48, True, 0),  # exactly one block; hd not a power of two
    ],
)
@pytest.mark.parametrize("strided", [False, True])
def test_matches_float64_reference(B, H, Hk, Lq, Lk, hd, causal, q_offset, strided):
    q, k, v = _qkv(B, H, Hk, Lq, Lk, hd, strided)
    out = cpu_flash.cpu_flash_attention(q, k, v, causal=causal, q_offset=q_offset)
    ref = reference(q, k, v, causal, q_offset, None)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g.float())
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5, msg=f"grad {name}")
        assert a.stride() == {"q": q, "k": k, "v": v}[name].stride()  # gradients in the inputs' layout


def test_matches_torch_sdpa_at_a_training_length():
    """At 1024 tokens (11 blocks of keys per query block), the same as torch's fp32 kernel."""
    q, k, v = _qkv(1, 4, 4, 1024, 1024, 64, strided=True, seed=3)
    g = torch.randn(1, 4, 1024, 64)
    out = cpu_flash.cpu_flash_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the output is a transposed view of (B, T, H, hd): the output projection's reshape needs no copy
    assert out.transpose(1, 2).is_contiguous()


def test_registered_op_passes_opcheck():
    """Schema, fake (meta) implementation and autograd registration, checked by torch itself."""
    q, k, v = _qkv(1, 2, 1, 40, 40, 16, strided=True)
    torch.library.opcheck(cpu_flash.flash_attention_cpu, (q, k, v, True, 0, 0.25))


def test_auto_picks_it_only_where_it_applies(monkeypatch):
    calls = []
    real = cpu_flash.flash_attention_cpu
    monkeypatch.setattr(cpu_flash, "flash_attention_cpu", lambda *a: calls.append(1) or real(*a))
    T = cpu_flash.MIN_QUERIES
    q, k, v = (torch.randn(1, 4, T, 32) for _ in range(3))
    attention(q, k, v)
    assert len(calls) == 1
    attention(q[:, :, : T - 1], k, v, q_offset=1)  # fewer queries: torch's kernel
    attention(q, k, v, alibi_slopes=alibi_slopes(4))  # ALiBi: not in these kernels
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    attention(q.bfloat16(), k.bfloat16(), v.bfloat16())  # bf16 on a CPU that runs it: not the fp32 kernel
    attention(q[..., :24], k[..., :24], v[..., :24])  # head dim not a multiple of 16
    assert len(calls) == 1
    monkeypatch.setattr(cpu_flash, "available", lambda: False)  # no compiler / LONGCTX_NATIVE=0
    out = attention(q, k, v, backend="cpu_flash")  # asked for by name: falls back to SDPA, same answer
    assert len(calls) == 1
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inference_runs_on_fp32_copies_where_the_cpu_emulates_it(monkeypatch, dtype):
    calls = []
    real = cpu_flash.flash_attention_cpu
    monkeypatch.setattr(cpu_flash, "flash_attention_cpu", lambda *a: calls.append(a[0].dtype) or real(*a))
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    q, k, v = (t.detach().to(dtype) for t in _qkv(1, 4, 2, 200, 260, 64, strided=True))
    with torch.no_grad():
        out = attention(q, k, v, q_offset=60)  # a prefill chunk after 60 cached keys, grouped-query heads
    assert calls == [torch.float32] and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()  # the layout the output projection reads without a copy
    ref = reference(q, k, v, True, 60, None)  # float64 on the same half-precision inputs
    # one rounding of the output to the half type (unit roundoff bf16 2^-8, fp16 2^-11) above fp32's error
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    torch.testing.assert_close(out.double(), ref, rtol=u, atol=u * ref.abs().max().item())
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    with torch.no_grad():
        attention(q, k, v, q_offset=60)  # a CPU with native bf16: its bf16 kernel where built, or torch's
    assert calls == [torch.float32]


@pytest.mark.parametrize("amx", [False, True])
def test_half_training_runs_on_fp32_copies_without_amx(monkeypatch, amx):
    """bf16 training without bf16 kernels: the fp32 kernels on differentiable copies on a CPU without AMX
    (faster than torch's bf16 kernels on Zen 4), torch's where AMX is; ours give float64's gradients on the
    same inputs within one bf16 rounding."""
    calls = []
    real = cpu_flash.flash_attention_cpu
    monkeypatch.setattr(cpu_flash, "flash_attention_cpu", lambda *a: calls.append(a[0].dtype) or real(*a))
    monkeypatch.setattr(cpu_flash, "cpu_flags", lambda: {"avx2", "amx_bf16"} if amx else {"avx2"})
    monkeypatch.setattr(cpu_flash, "has", lambda fn: False)  # a build without AVX512-BF16
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in _qkv(1, 4, 2, 200, 200, 64, strided=True))
    out = attention(q, k, v)
    assert calls == ([] if amx else [torch.float32]) and out.dtype == torch.bfloat16
    if amx:
        return  # torch's bf16 kernels: their accuracy is torch's (they round more than one step: not checked)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, True, 0, None)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for a, b in zip(grads, ref_grads):  # fp32 arithmetic, one rounding to bf16 (u = 2^-8)
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, rtol=2**-8, atol=2**-8 * b.abs().max().item())


def test_fp16_training_takes_the_copies_whatever_bf16_kernels_exist(monkeypatch):
    """The bf16 kernels take bf16 only: fp16 training on a CPU without AMX stays on the fp32 kernels on copies."""
    monkeypatch.setattr(cpu_flash, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setattr(cpu_flash, "bf16_kernels", lambda: True)
    q, k, v = (t.detach().half().requires_grad_() for t in _qkv(1, 2, 2, 160, 160, 64, strided=True))
    assert cpu_flash.supports_upcast(q, k, v) and not cpu_flash.supports_bf16(q, k, v)
    assert not cpu_flash.upcasts_half_training(torch.bfloat16) and cpu_flash.upcasts_half_training(
        torch.float16
    )


def test_model_trains_the_same_with_either_kernel():
    """A model's loss and every parameter's gradient with cpu_flash equal those with torch's SDPA."""
    results = []
    for backend in ("sdpa", "cpu_flash"):
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_preset("tiny", attn_backend=backend, n_kv_head=2))
        ids = torch.randint(0, model.config.vocab_size, (2, 161), generator=torch.Generator().manual_seed(1))
        batch = {
            "input_ids": ids[:, :-1],
            "labels": ids[:, 1:],
            "position_ids": torch.arange(160).expand(2, -1),
        }
        loss = lm_loss(model, batch, chunk_size=64)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_out_of_memory_in_the_kernel_is_a_clear_error(monkeypatch):
    class Failing:  # the C functions return 1 when a work buffer cannot be allocated
        def lc_flash_forward(self, *args):
            return 1

    monkeypatch.setattr(cpu_flash, "library", lambda: Failing())
    q, k, v = _qkv(1, 2, 2, 8, 8, 16, strided=False)
    with pytest.raises(MemoryError, match="out of memory .* shorter sequence"):
        cpu_flash.flash_attention_cpu(q, k, v, True, 0, 0.25)


needs_bf16_kernels = pytest.mark.skipif(
    not cpu_flash.bf16_kernels(),
    reason="no bf16 attention kernels here (they need AVX512-BF16, native bf16 and no AMX: "
    "longctx.kernels.ISAS, longctx.attention.cpu_flash.bf16_kernels)",
)


@needs_bf16_kernels
@pytest.mark.parametrize(
    "B,H,Hk,Lq,Lk,hd,causal,q_offset",
    [
        (1, 2, 2, 300, 300, 64, True, 0),  # 96-blocks: 3 full, 1 ragged (an odd number of keys in it)
        (2, 4, 2, 203, 203, 64, True, 0),  # grouped-query heads, odd length
        (1, 3, 3, 97, 131, 32, True, 34),  # queries after 34 cached keys
        (1, 2, 1, 50, 77, 128, False, 0),  # no mask, more keys than queries
        (1, 1, 1, 5, 5, 32, True, 0),  # smaller than one block
    ],
)
@pytest.mark.parametrize("strided", [False, True])
def test_bf16_forward_within_its_rounding_of_float64(B, H, Hk, Lq, Lk, hd, causal, q_offset, strided):
    """bf16 inputs taken as exact; the kernel rounds the probabilities to bf16 before P V and the output
    once, each rounding within bf16's unit roundoff u = 2^-8 (8 significant bits): so each element is within
    u |o| + u sum_j p_j |v_j| of float64 on the same inputs (plus fp32's ~1e-7)."""
    q, k, v = (t.detach().bfloat16() for t in _qkv(B, H, Hk, Lq, Lk, hd, strided, seed=Lq))
    with torch.no_grad():
        assert cpu_flash.supports_bf16(q, k, v)
        out = cpu_flash.cpu_flash_attention(q, k, v, causal=causal, q_offset=q_offset)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    ref = reference(q.double(), k.double(), v.double(), causal, q_offset, None)
    ref_abs = reference(q.double(), k.double(), v.double().abs(), causal, q_offset, None)
    bound = 2**-8 * (ref.abs() + ref_abs) + 1e-6
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max():.3g}"
    assert err.max() > 0  # it did round (the bound is not vacuous: fp32 would be ~1e-7)


def test_bf16_forward_is_declined_where_it_does_not_apply(monkeypatch):
    q, k, v = (t.detach().bfloat16() for t in _qkv(1, 2, 2, 128, 128, 48, False))
    assert not cpu_flash.supports_bf16(q, k, v)  # hd not a multiple of 32
    q, k, v = (t.detach().bfloat16() for t in _qkv(1, 2, 2, 128, 128, 64, False))
    monkeypatch.setattr(cpu_flash, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16"})
    assert not cpu_flash.supports_bf16(q, k, v)  # an AMX CPU keeps torch's bf16 kernels (not measured there)
    monkeypatch.setattr(cpu_flash, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(cpu_flash, "cpu_emulates", lambda dtype: True)
    assert not cpu_flash.supports_bf16(q, k, v)  # the flag is there but the timed check found bf16 slow


@needs_bf16_kernels
@pytest.mark.parametrize(
    "B,H,Hk,Lq,Lk,hd,causal,q_offset",
    [
        (1, 2, 2, 300, 300, 64, True, 0),  # 96-blocks: 3 full, 1 ragged (an odd number of keys in it)
        (2, 4, 2, 203, 203, 64, True, 0),  # grouped-query heads, odd length (odd query rows in a block)
        (1, 3, 3, 97, 131, 32, True, 34),  # queries after 34 cached keys
        (1, 2, 1, 50, 77, 128, False, 0),  # no mask, more keys than queries
        (1, 1, 1, 5, 5, 32, True, 0),  # smaller than one block
    ],
)
@pytest.mark.parametrize("strided", [False, True])
def test_bf16_backward_within_its_roundings_of_float64(B, H, Hk, Lq, Lk, hd, causal, q_offset, strided):
    """Gradients through the bf16 op against float64 autograd on the same bf16 inputs and output gradient.
    With u = 2^-8 (bf16's unit roundoff), the kernel rounds: P before dV = P^T dO (each term off by u p |dO|);
    dS before dK = dS^T Q and dQ = dS K (u |dS|); each gradient once at the end (u |grad|); and it takes
    D = rowsum(dO o) from the forward's bf16 output, o within u (|o| + P|v|) of exact (the forward's test), so
    D within u Dabs, Dabs = rowsum(|dO| (|o| + P|v|)), and dS within u P Dabs scale more. So, elementwise,
    |dV - ref| <= u (|ref| + P^T |dO|), |dK - ref| <= u (|ref| + W^T |Q|), |dQ - ref| <= u (|ref| + W |K|)
    with W = |dS| + P Dabs scale; times (1 + 4u) for the second-order terms and fp32's sums (~1e-7)."""
    u = 2.0**-8
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in _qkv(B, H, Hk, Lq, Lk, hd, strided, seed=Lq))
    assert cpu_flash.supports_bf16(q, k, v)
    out = cpu_flash.cpu_flash_attention(q, k, v, causal=causal, q_offset=q_offset)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).bfloat16()
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, causal, q_offset, None)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    # the float64 pieces of the bound, per query head (k, v repeated over the grouped heads)
    G, scale = H // Hk, hd**-0.5
    K, V = (t.detach().repeat_interleave(G, dim=1) for t in (k64, v64))
    Q, dO, o = q64.detach(), g.double(), ref.detach()
    scores = Q @ K.transpose(-1, -2) * scale
    if causal:
        keep = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + q_offset
        scores = scores.masked_fill(~keep, float("-inf"))
    P = scores.softmax(-1)
    dS = P * (dO @ V.transpose(-1, -2) - (dO * o).sum(-1, keepdim=True)) * scale
    Dabs = (dO.abs() * (o.abs() + P @ V.abs())).sum(-1, keepdim=True)
    W = dS.abs() + P * Dabs * scale

    def per_key_head(x):  # (B, H, Lk, hd) summed over each group of query heads -> (B, Hk, Lk, hd)
        return x.reshape(B, Hk, G, Lk, hd).sum(2)

    terms = {
        "q": W @ K.abs(),
        "k": per_key_head(W.transpose(-1, -2) @ Q.abs()),
        "v": per_key_head(P.transpose(-1, -2) @ dO.abs()),
    }
    for name, a, b in zip("qkv", grads, ref_grads):
        assert a.dtype == torch.bfloat16 and a.stride() == {"q": q, "k": k, "v": v}[name].stride()
        bound = u * (b.abs() + terms[name]) * (1 + 4 * u) + 1e-7
        err = (a.double() - b).abs()
        assert (err <= bound).all(), f"grad {name}: worst excess {(err - bound).max():.3g}"
        assert err.max() > 0  # it did round (fp32 would be ~1e-7 off)


@needs_bf16_kernels
def test_bf16_training_takes_the_bf16_op_and_opcheck_passes():
    """A bf16 model's attention under training runs the bf16 op (no fp32 copies); torch's own check of its
    schema, fake implementation and autograd registration."""
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in _qkv(1, 2, 1, 160, 160, 64, strided=True))
    assert cpu_flash.supports_bf16(q, k, v) and not cpu_flash.upcasts_half_training()
    torch.library.opcheck(cpu_flash.flash_attention_bf16, (q, k, v, True, 0, 0.125))
    calls = []
    real = cpu_flash.flash_attention_bf16
    try:
        cpu_flash.flash_attention_bf16 = lambda *a: calls.append(a[0].dtype) or real(*a)
        out = attention(q, k, v)
    finally:
        cpu_flash.flash_attention_bf16 = real
    out.float().sum().backward()
    assert calls == [torch.bfloat16] and q.grad.dtype == torch.bfloat16 and k.grad.abs().sum() > 0


@needs_bf16_kernels
@pytest.mark.parametrize("q_offset", [0, 40])
def test_bf16_copies_backend_within_its_rounding_of_float64(q_offset):
    """`cpu_flash_bf16` (quantized weights' bf16 prefill): fp32 q, k, v rounded to bf16, the bf16 forward,
    the output widened: within the bf16 forward's bound of float64 on the rounded inputs, in the model's
    layout; the fp32 kernel it replaces is not called."""
    from longctx.attention.dispatch import attention as dispatch

    q, k, v = (t.detach() for t in _qkv(1, 4, 2, 200, 200 + q_offset, 64, strided=True, seed=7))
    with torch.no_grad():
        out = dispatch(q, k, v, q_offset=q_offset, backend="cpu_flash_bf16")
    assert out.dtype == torch.float32 and out.transpose(1, 2).is_contiguous()
    qb, kb, vb = (t.bfloat16().double() for t in (q, k, v))
    ref = reference(qb, kb, vb, True, q_offset, None)
    bound = 2**-8 * (ref.abs() + reference(qb, kb, vb.abs(), True, q_offset, None)) + 1e-6
    err = (out.double() - ref).abs()
    assert (err <= bound).all() and err.max() > 1e-5  # rounded (fp32 would be ~1e-7 off)
