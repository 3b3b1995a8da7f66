"""The native decode kernels against float64 references (torch ops), and the 16-bit KV caches they read."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longctx import GPT, GPTConfig
from longctx.attention import cpu_decode
from longctx.errors import ConfigError
from longctx.infer import native
from longctx.infer.cache import Int8KVCache, make_cache
from longctx.infer.generate import forward_last, prefill

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"no native kernels: {native.unavailable_reason()}"
)


@needs_native
@pytest.mark.parametrize("M,N,K", [(1, 1, 8), (1, 37, 96), (3, 200, 515), (16, 6, 1376)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float64(M, N, K, bias):
    g = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    with torch.no_grad():
        assert native.linear_ok(x, w, b)
        out = native.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    # fp32 accumulation over K terms of size ~1: error ~ sqrt(K) * 2^-24 * |terms|
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5 * K**0.5)


@needs_native
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("xdtype", ["same", torch.float32])
def test_16_bit_weights_match_float64_and_round_once(wdtype, xdtype):
    g = torch.Generator().manual_seed(3)
    xdtype = wdtype if xdtype == "same" else xdtype
    x, w = torch.randn(2, 200, generator=g).to(xdtype), torch.randn(49, 200, generator=g).to(wdtype)
    b = torch.randn(49, generator=g).to(wdtype)
    with torch.no_grad():
        assert native.linear_ok(x, w, b)
        out = native.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double())  # exact products of the 16-bit values
    assert out.dtype == xdtype
    if xdtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5 * 200**0.5)
    else:  # fp32 accumulation, then one rounding to the 16-bit dtype
        torch.testing.assert_close(out, ref.to(xdtype), rtol=2**-7, atol=1e-3)


def test_linear_declines_what_it_cannot_take():
    w = torch.randn(8, 4, requires_grad=True)
    assert not native.linear_ok(torch.randn(2, 4), w, None)  # autograd must see it
    with torch.no_grad():
        assert not native.linear_ok(torch.randn(64, 4), w, None)  # a GEMM: MKL's job
        assert not native.linear_ok(torch.randn(2, 4).double(), w.double(), None)
        assert not native.linear_ok(torch.randn(2, 4).half(), w.bfloat16(), None)  # x in another 16-bit type
        assert not native.linear_ok(torch.randn(2, 4), w.detach().t().contiguous().t(), None)


def _reference_attention(q, k, v, starts, slopes):
    """float64: q (B, H, 1, hd) after the last of S keys (B, K, S, hd); keys before starts[b] masked."""
    G = q.shape[1] // k.shape[1]
    return _reference_scores(q, k, starts, slopes).softmax(-1) @ v.double().repeat_interleave(G, 1)


def _reference_scores(q, k, starts, slopes):
    """float64 (B, H, 1, S): the scores `_reference_attention` takes the softmax of."""
    B, H, _, hd = q.shape
    G, S = H // k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(G, 1)
    scores = q.double() @ kk.transpose(-1, -2) * hd**-0.5  # (B, H, 1, S)
    if slopes is not None:
        scores = scores - slopes.double()[None, :, None, None] * (S - 1 - torch.arange(S)).double()
    if starts is not None:
        masked = torch.arange(S)[None, :] < starts[:, None]  # (B, S)
        scores = scores.masked_fill(masked[:, None, None], float("-inf"))
    return scores


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "B,Hkv,G,S,hd,padded,alibi",
    [
        (1, 4, 1, 1, 64, False, False),  # a single key
        (1, 8, 1, 301, 64, False, False),  # S not a multiple of 8: the exp tail
        (2, 2, 4, 257, 72, True, False),  # grouped queries, padded rows, hd not a multiple of 16
        (2, 3, 1, 100, 128, True, True),  # two sweeps over hd, ALiBi
    ],
)
def test_decode_attention_matches_float64(dtype, B, Hkv, G, S, hd, padded, alibi):
    g = torch.Generator().manual_seed(S + hd)
    # keys/values as a cache holds them: a prefix of a longer buffer (head stride != S * hd)
    k = torch.randn(B, Hkv, S + 40, hd, generator=g)[:, :, :S].to(dtype)
    v = torch.randn(B, Hkv, S + 40, hd, generator=g)[:, :, :S].to(dtype)
    q = torch.randn(B, Hkv * G, 1, hd, generator=g) * 2  # scaled up: peaked softmax rows too
    starts = torch.tensor([0, S // 3])[:B] if padded else None
    slopes = torch.rand(Hkv * G, generator=g) * 0.2 if alibi else None
    with torch.no_grad():
        assert cpu_decode.supports(q, k, v)
        out = cpu_decode.decode_attention(q, k, v, starts=starts, alibi_slopes=slopes)
    ref = _reference_attention(q, k, v, starts, slopes)  # on the stored (rounded) values: exact math
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_decode_attention_over_key_ranges_matches_float64(threads, dtype):
    """SmolLM2's grouping (9 query heads on 3 key/value heads) over a long cache, which the kernel splits
    into ranges of keys merged afterwards: a row with every key, one whose single visible key leaves the other ranges
    empty, one starting inside a range; S not a multiple of the 8-key blocks; ALiBi's distances."""
    g = torch.Generator().manual_seed(threads)
    B, Hkv, G, S, hd = 3, 3, 3, 4096 + 5, 64
    k, v = (torch.randn(B, Hkv, S, hd, generator=g) for _ in range(2))
    scales = None
    if dtype == torch.int8:  # an Int8KVCache's values and per-token scales; the reference reads them exactly
        (k, ks), (v, vs) = Int8KVCache.quantize(k), Int8KVCache.quantize(v)
        scales, k_ref, v_ref = (ks, vs), k.double() * ks.double(), v.double() * vs.double()
    else:
        k, v = k.to(dtype), v.to(dtype)
        k_ref, v_ref = k, v
    q = torch.randn(B, Hkv * G, 1, hd, generator=g) * 2
    starts, slopes = torch.tensor([0, S - 1, 1000]), torch.rand(Hkv * G, generator=g) * 0.01
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    lse = torch.empty(B, Hkv * G, 1)  # each head's logsumexp as well (the context methods merge by it)
    try:
        with torch.no_grad():
            out = cpu_decode.decode_attention(
                q, k, v, starts=starts, alibi_slopes=slopes, scales=scales, lse=lse
            )
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(
        out.double(), _reference_attention(q, k_ref, v_ref, starts, slopes), rtol=1e-5, atol=1e-5
    )
    want = _reference_scores(q, k_ref, starts, slopes).logsumexp(-1)
    torch.testing.assert_close(lse.double(), want, rtol=1e-5, atol=1e-5)


@needs_native
def test_decode_attention_declines_other_layouts():
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 4, 10, 64)
    with torch.no_grad():
        assert not cpu_decode.supports(torch.randn(1, 4, 2, 64), k, k)  # two queries: not a decode step
        assert not cpu_decode.supports(
            q, k.transpose(-1, -2).contiguous().transpose(-1, -2), k
        )  # strided rows
        assert not cpu_decode.supports(q[..., :60], k[..., :60], k[..., :60])  # hd % 8 != 0
        assert not cpu_decode.supports(q.double(), k.double(), k.double())


# -- 16-bit caches through the engine's two forwards ------------------------------------------------------
def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny", n_layer=2, max_seq_len=256, init_std=0.05)).eval()


@pytest.mark.parametrize("kv_dtype", ["fp16", "bf16"])
def test_16bit_cache_decodes_like_dequantised_fp32(kv_dtype, monkeypatch):
    """The decode path that reads 16-bit values as stored (native kernel) gives what torch's attention
    gives on the same values widened to fp32 (the fallback path), and stays near the exact fp32 cache."""
    model = _model()
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(1))

    def run(cache):
        with torch.no_grad():
            out = [prefill(model, cache, ids[:, :100], chunk=32)]
            out += [forward_last(model, cache, ids[:, t : t + 1]) for t in range(100, 120)]
        return torch.stack(out)

    half = make_cache(model.config, 1, 120, kv_dtype=kv_dtype)
    assert half.k.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[kv_dtype]
    assert half.nbytes * 2 == make_cache(model.config, 1, 120).nbytes
    fast = run(half)
    monkeypatch.setattr(cpu_decode, "supports", lambda *a: False)  # widen into fp32, then torch's sdpa
    slow = run(make_cache(model.config, 1, 120, kv_dtype=kv_dtype))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    exact = run(make_cache(model.config, 1, 120))
    spread = exact.max() - exact.min()
    assert (fast - exact).abs().max() < (2e-3 if kv_dtype == "fp16" else 2e-2) * spread


def test_fp16_cache_refuses_values_out_of_range():
    model = _model()
    with torch.no_grad():
        model.blocks[0].attn.v_proj.weight.mul_(1e6)  # values far past 65504
    cache = make_cache(model.config, 1, 16, kv_dtype="fp16")
    with pytest.raises(ConfigError, match="fp16's range"):
        prefill(model, cache, torch.zeros(1, 8, dtype=torch.long))


def test_unknown_kv_dtype_is_named():
    with pytest.raises(ConfigError, match="unknown KV cache dtype 'fp8'"):
        make_cache(_model().config, 1, 8, kv_dtype="fp8")
