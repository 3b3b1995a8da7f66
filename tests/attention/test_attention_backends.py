"""`sdpa`, `chunked` and `cpu_flash` (native kernels, or its SDPA fallback for ALiBi) agree with each other and with a float64 reference, in outputs and gradients."""

import math

import pytest
import torch

from longctx.attention import attention
from longctx.positions.alibi import alibi_slopes


def reference(q, k, v, causal, q_offset, slopes):
    """Plain float64 softmax attention with an explicit mask (the textbook formula)."""
    q, k, v = q.double(), k.double(), v.double()
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i = torch.arange(q.shape[2])[:, None] + q_offset
    j = torch.arange(k.shape[2])[None]
    if slopes is not None:
        d = (i - j) if causal else (i - j).abs()
        s = s - slopes.double()[:, None, None] * d
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("Tq,q_offset", [(37, 0), (45, 0), (13, 20), (1, 30)])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_backends_match_reference_fp32(causal, alibi, Tq, q_offset, kv_heads):
    torch.manual_seed(0)
    B, H, hd = 2, 4, 16
    Tk = Tq + q_offset
    q = torch.randn(B, H, Tq, hd, requires_grad=True)
    k = torch.randn(B, kv_heads, Tk, hd, requires_grad=True)
    v = torch.randn(B, kv_heads, Tk, hd, requires_grad=True)
    slopes = alibi_slopes(H) if alibi else None
    ref = reference(q, k, v, causal, q_offset, slopes)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for backend in ("sdpa", "chunked", "cpu_flash"):
        out = attention(
            q, k, v, causal=causal, q_offset=q_offset, alibi_slopes=slopes, backend=backend, chunk_size=16
        )  # 16 does not divide 37/45: ragged last blocks
        grads = torch.autograd.grad(out, (q, k, v), g.float())
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


def test_chunked_is_exact_in_float64():
    """In float64 the blockwise online softmax and its recomputing backward equal the textbook formula."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 50, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, backend="chunked", chunk_size=7)
    ref = reference(q, k, v, True, 0, None)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_chunked_memory_does_not_hold_the_score_matrix():
    """The saved tensors for backward are O(L), not O(L^2)."""
    L = 2048
    q = torch.randn(1, 1, L, 16, requires_grad=True)
    k = torch.randn(1, 1, L, 16, requires_grad=True)
    v = torch.randn(1, 1, L, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        attention(q, k, v, backend="chunked", chunk_size=128)
    assert max(saved) <= L * 16 * 2 and sum(saved) < L * L / 8
