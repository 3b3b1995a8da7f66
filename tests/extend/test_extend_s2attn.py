"""S²-Attn against direct references: LongLoRA's own roll-based code (transliterated, float64 masked softmax)
and an explicit per-head group mask for the partition variant; gradients too."""

from __future__ import annotations

import math

import pytest
import torch

from longctx.attention import attention
from longctx.config import GPTConfig
from longctx.errors import ConfigError
from longctx.extend.s2attn import s2_attention, s2_backend
from longctx.model import GPT


def _masked_attention(q, k, v, allowed):
    """Plain softmax attention with a boolean (H|1, T, T) mask; float64 reference."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


def longlora_roll_reference(q, k, v, group_ratio=0.25):
    """LongLoRA `forward_noflashattn` (llama_attn_replace.py), on (B, H, T, hd) states after RoPE:
    shift half the heads by roll(-g/2), attend causally within groups, roll the output back."""
    B, H, T, hd = q.shape
    g = int(T * group_ratio)
    n = T // g

    def shift(x):
        x = x.clone()
        x[:, H // 2 :] = x[:, H // 2 :].roll(-g // 2, dims=2)
        return x.transpose(1, 2).reshape(B * n, g, H, hd).transpose(1, 2)  # (B*n, H, g, hd)

    causal = torch.ones(g, g, dtype=torch.bool).tril()
    out = _masked_attention(shift(q), shift(k), shift(v), causal[None])  # (B*n, H, g, hd)
    out = out.transpose(1, 2).reshape(B, T, H, hd)
    out[:, :, H // 2 :] = out[:, :, H // 2 :].roll(g // 2, dims=1)
    return out.transpose(1, 2)


def partition_reference(q, k, v, group_ratio=0.25):
    """Per-head segment ids: plain heads i // g, shifted heads (i + g/2) // g; attend where the segment is
    the same and j <= i."""
    B, H, T, hd = q.shape
    g = int(T * group_ratio)
    i = torch.arange(T)
    seg_plain, seg_shift = i // g, (i + g // 2) // g
    seg = torch.stack([seg_plain if h < H // 2 else seg_shift for h in range(H)])  # (H, T)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (i[None, :, None] >= i[None, None, :])
    return _masked_attention(q, k, v, allowed)


def _qkv(B=2, H=4, T=32, hd=8, K=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = K or H
    q = torch.randn(B, H, T, hd, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(B, K, T, hd, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(B, K, T, hd, dtype=torch.float64, generator=g, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize(("H", "T", "ratio"), [(4, 32, 0.25), (6, 48, 0.25), (2, 16, 0.5), (5, 40, 0.25)])
def test_roll_variant_equals_longlora_code(H, T, ratio):
    q, k, v = _qkv(H=H, T=T)
    got = s2_attention(q, k, v, group_ratio=ratio, shift="roll")
    ref = longlora_roll_reference(q, k, v, ratio)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # and the gradients
    w = torch.randn_like(got)
    g1 = torch.autograd.grad((got * w).sum(), (q, k, v))
    g2 = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("H", "K", "T", "ratio"), [(4, 4, 32, 0.25), (8, 2, 32, 0.25), (6, 3, 24, 0.25), (4, 4, 16, 0.5)]
)
def test_partition_variant_equals_group_mask_reference(H, K, T, ratio):
    q, k, v = _qkv(H=H, K=K, T=T)
    got = s2_attention(q, k, v, group_ratio=ratio, shift="partition")
    kr, vr = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)  # GQA: query head h -> kv h // G
    ref = partition_reference(q, kr, vr, ratio)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(got)
    g1 = torch.autograd.grad((got * w).sum(), (q, k, v))
    g2 = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_no_token_sees_the_future_in_partition_mode():
    q, k, v = _qkv(H=4, T=32)
    base = s2_attention(q, k, v, shift="partition")
    v2 = v.detach().clone()
    v2[:, :, 20:] += 100.0  # change the future of token 19
    after = s2_attention(q, k, v2, shift="partition")
    torch.testing.assert_close(after[:, :, :20], base[:, :, :20])


@pytest.mark.parametrize("shift", ["partition", "roll"])
def test_one_group_is_full_attention(shift):
    q, k, v = _qkv(H=4, T=24)
    full = attention(q, k, v, causal=True, backend="sdpa")
    torch.testing.assert_close(s2_attention(q, k, v, group_ratio=1.0, shift=shift), full)


def test_full_attention_without_grad_and_through_the_model():
    """With the S² backend in its forward the model trains with S² but evaluates (no grad) with full
    attention."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, n_layer=2, n_head=4, d_model=32, max_seq_len=32))
    ids = torch.randint(0, 32, (2, 32))
    with torch.no_grad():
        full = model(ids)
    s2_attn = s2_backend()
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model.hidden_states(ids, attention=s2_attn)), full)
    s2 = model.logits(model.hidden_states(ids, attention=s2_attn))  # grad enabled: sparse attention
    s2.sum().backward()
    assert not torch.allclose(s2, full, atol=1e-4)
    # tokens 0..3 (the first half group, in every head's first group) see all their past in both
    torch.testing.assert_close(s2[:, :4], full[:, :4], rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())
    # without it: full attention again
    torch.testing.assert_close(model(ids), full, rtol=1e-5, atol=1e-5)


def test_bad_length_is_a_config_error():
    q, k, v = _qkv(H=4, T=30)
    with pytest.raises(ConfigError, match="seq-len"):
        s2_attention(q, k, v)
    with pytest.raises(ConfigError, match="ALiBi"):
        s2_attention(*_qkv(H=4, T=32), alibi_slopes=torch.ones(4))
