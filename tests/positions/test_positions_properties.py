"""Properties of the position encodings against closed forms: RoPE is relative, ALiBi's slopes are the
paper's, and the learned table's interpolation keeps its endpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from longctx.config import GPTConfig
from longctx.positions.absolute import LearnedPositions
from longctx.positions.alibi import alibi_slopes
from longctx.positions.rope import ROPE_INIT_FUNCTIONS, RotaryPositions, apply_rotary

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "ntk", "factor": 4.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
]


def _config(rope_scaling, prf: float = 1.0) -> GPTConfig:
    return GPTConfig(
        n_head=2, d_model=64, max_seq_len=64, partial_rotary_factor=prf, rope_scaling=rope_scaling
    )


@pytest.mark.parametrize("rope_scaling", SCALINGS, ids=lambda s: (s or {}).get("rope_type", "default"))
@pytest.mark.parametrize("prf", [1.0, 0.5])
def test_rope_score_depends_only_on_position_difference(rope_scaling, prf):
    """<R(m) q, R(n) k> = <R(m+t) q, R(n+t) k> for any shift t: float64 rotation with the method's
    frequencies, through apply_rotary (HF's half-split layout, partial rotary)."""
    torch.manual_seed(0)
    config = _config(rope_scaling, prf)
    inv_freq, af = ROPE_INIT_FUNCTIONS[config.rope_type](config, None)
    q, k = torch.randn(2, 1, 1, 1, 32, dtype=torch.float64)

    def rotate(x, pos: int):
        ang = torch.tensor([[float(pos)]], dtype=torch.float64)[..., None] * inv_freq.double()  # (1, 1, rd/2)
        emb = torch.cat([ang, ang], -1)
        return apply_rotary(x, emb.cos() * af, emb.sin() * af)

    for m, n in [(5, 2), (40, 3), (100, 100), (7, 30)]:
        ref = float((rotate(q, m) * rotate(k, n)).sum())
        for t in (1, 17, 1000, 123457):
            assert float((rotate(q, m + t) * rotate(k, n + t)).sum()) == pytest.approx(
                ref, rel=1e-9, abs=1e-12
            )


@pytest.mark.parametrize("rope_scaling", SCALINGS, ids=lambda s: (s or {}).get("rope_type", "default"))
def test_rotary_cos_sin_keep_the_relative_property(rope_scaling):
    """The same through RotaryPositions.rotary (float32 cos/sin), at a float32 tolerance."""
    torch.manual_seed(0)
    pos_mod = RotaryPositions(_config(rope_scaling))
    q = torch.randn(1, 1, 1, 32, dtype=torch.float64).expand(1, 1, 200, 32)
    k = torch.randn(1, 1, 1, 32, dtype=torch.float64).expand(1, 1, 200, 32)
    cos, sin = pos_mod.rotary(torch.arange(200)[None])
    qr, kr = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = qr[0, 0] @ kr[0, 0].T  # (200, 200)
    for delta in (0, 3, 50):
        diag = torch.diagonal(scores, offset=-delta)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_head", [8, 12, 6, 16])
def test_alibi_slopes_match_paper(n_head):
    """Press et al.: 2^(-8i/n), i=1..n for a power of two n; otherwise the 2^floor(log2 n) slopes, then
    the odd-indexed slopes of the next power of two (2^(-8i/2m), i = 1, 3, 5, ...)."""
    m = 2 ** math.floor(math.log2(n_head))
    expected = [2 ** (-8 * i / m) for i in range(1, m + 1)]
    expected += [2 ** (-8 * i / (2 * m)) for i in range(1, 2 * (n_head - m), 2)]
    got = alibi_slopes(n_head)
    assert got.shape == (n_head,)
    np.testing.assert_allclose(got.double().numpy(), np.array(expected), rtol=1e-7)
    if n_head == 8:
        np.testing.assert_allclose(got.numpy(), [1 / 2**i for i in range(1, 9)], rtol=1e-7)


def test_learned_interpolation_keeps_endpoints_and_is_linear():
    torch.manual_seed(0)
    pos = LearnedPositions(GPTConfig(position="learned", n_head=2, d_model=16, max_seq_len=9))
    old = pos.table.weight.detach().double().clone()  # (9, 16)
    pos.interpolate_to(33)
    new = pos.table.weight.detach().double()
    assert new.shape == (33, 16)
    torch.testing.assert_close(new[0], old[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(new[-1], old[-1], rtol=0, atol=1e-7)
    # row j sits at old position j * (9-1)/(33-1): numpy's linear interpolation in float64
    x_new = np.arange(33) * 8 / 32
    ref = np.stack([np.interp(x_new, np.arange(9), old[:, c].numpy()) for c in range(16)], axis=1)
    np.testing.assert_allclose(new.numpy(), ref, rtol=0, atol=1e-6)
    # it now addresses positions up to 32
    x = torch.zeros(1, 33, 16)
    assert pos.embed(x, torch.arange(33)[None]).shape == (1, 33, 16)
