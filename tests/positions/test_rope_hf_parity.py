"""Every RoPE scaling against Hugging Face transformers (the reference implementation of `rope_scaling`):
inv_freq and attention factor from `ROPE_INIT_FUNCTIONS`, and cos/sin from `LlamaRotaryEmbedding`, including
its runtime update for the length-dependent types."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from longctx.config import GPTConfig
from longctx.errors import ConfigError
from longctx.positions.rope import ROPE_INIT_FUNCTIONS, RotaryPositions, length_dependent_types

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS as HF_ROPE  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

HEAD_DIM, N_HEAD, MAX_LEN = 32, 2, 64


def _ramp(n: int, lo: float, hi: float) -> list[float]:
    return [lo + (hi - lo) * i / max(1, n - 1) for i in range(n)]


def _longrope(prf: float, **extra) -> dict:
    n = int(HEAD_DIM * prf) // 2
    return {
        "rope_type": "longrope",
        "short_factor": _ramp(n, 1.0, 1.5),
        "long_factor": _ramp(n, 1.0, 12.0),
        **extra,
    }


# (rope_scaling, rope_theta): several parameter sets per HF type
HF_CASES = [
    ({"rope_type": "linear", "factor": 4.0}, 10000.0),
    ({"rope_type": "linear", "factor": 2}, 500000.0),
    ({"rope_type": "dynamic", "factor": 4.0}, 10000.0),
    ({"rope_type": "dynamic", "factor": 3.3}, 1000.0),
    ({"type": "dynamic", "factor": 2.0}, 10000.0),  # legacy key
    ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16}, 10000.0),
    ({"rope_type": "yarn", "factor": 4.0}, 10000.0),  # original defaults to max_position_embeddings
    (
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 8,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "truncate": False,
        },
        50000.0,
    ),
    (
        {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 4,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
        },
        10000.0,
    ),  # DeepSeek-style mscale ratio
    (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 1.5},
        10000.0,
    ),
    ({"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16}, 10000.0),  # implied s
    ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}, 10000.0),  # legacy key
    ("longrope", {"original_max_position_embeddings": 16}),
    ("longrope", {"original_max_position_embeddings": 16, "factor": 4.0, "attention_factor": 1.2}),
    ("longrope", {"original_max_position_embeddings": 32, "factor": 2.0}),
    (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        500000.0,
    ),
    (
        {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 32,
        },
        10000.0,
    ),
]
PRF = [1.0, 0.5]


def _configs(rope_scaling: dict, theta: float, prf: float) -> tuple[GPTConfig, LlamaConfig]:
    ours = GPTConfig(
        n_head=N_HEAD,
        d_model=N_HEAD * HEAD_DIM,
        max_seq_len=MAX_LEN,
        rope_theta=theta,
        partial_rotary_factor=prf,
        rope_scaling=dict(rope_scaling),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = LlamaConfig(
            hidden_size=N_HEAD * HEAD_DIM,
            num_attention_heads=N_HEAD,
            num_key_value_heads=N_HEAD,
            head_dim=HEAD_DIM,
            max_position_embeddings=MAX_LEN,
            rope_theta=theta,
            partial_rotary_factor=prf,
            rope_scaling=dict(rope_scaling),
            num_hidden_layers=1,
            vocab_size=16,
            intermediate_size=8,
        )
    return ours, hf


def _cases(prf: float):
    for case, theta in HF_CASES:
        if case == "longrope":
            yield _longrope(prf, **theta), 10000.0
        else:
            yield case, theta


ALL = [(rs, th, prf) for prf in PRF for rs, th in _cases(prf)]
IDS = [f"{rs.get('rope_type', rs.get('type'))}-{i}-prf{prf}" for i, (rs, _, prf) in enumerate(ALL)]


@pytest.mark.parametrize(("rope_scaling", "theta", "prf"), ALL, ids=IDS)
def test_inv_freq_and_attention_factor_equal_transformers(rope_scaling, theta, prf):
    ours, hf = _configs(rope_scaling, theta, prf)
    rope_type = ours.rope_type
    for seq_len in (None, MAX_LEN // 2, MAX_LEN, 3 * MAX_LEN + 5):
        inv, af = ROPE_INIT_FUNCTIONS[rope_type](ours, seq_len)
        hf_inv, hf_af = HF_ROPE[rope_type](hf, None, seq_len)
        assert inv.dtype == hf_inv.dtype == torch.float32
        assert inv.shape == (int(HEAD_DIM * prf) // 2,)
        assert torch.equal(inv, hf_inv), (rope_type, seq_len)
        assert af == pytest.approx(hf_af, rel=0, abs=0), (rope_type, seq_len)


@pytest.mark.parametrize(
    ("rope_scaling", "theta"), list(_cases(1.0)), ids=[i for i in IDS if i.endswith("prf1.0")]
)
def test_cos_sin_equal_llama_rotary_embedding(rope_scaling, theta):
    """cos/sin for growing lengths (within, at and past max_position_embeddings), as HF's module computes
    them at run time, including the dynamic/longrope frequency update."""
    ours, hf = _configs(rope_scaling, theta, 1.0)
    mine = RotaryPositions(ours)
    ref = LlamaRotaryEmbedding(hf)
    x = torch.zeros(1, dtype=torch.float32)
    for T in (MAX_LEN // 2, MAX_LEN, MAX_LEN + 1, 2 * MAX_LEN + 16, 4 * MAX_LEN):
        pos = torch.arange(T)[None]
        cos, sin = mine.rotary(pos)
        hcos, hsin = ref(x, pos)
        # HF's run-time dynamic update computes the new base in float32 tensors, we in float64: ulp-level
        torch.testing.assert_close(cos, hcos)
        torch.testing.assert_close(sin, hsin)


def test_ntk_matches_closed_form_and_hf_dynamic_at_full_length():
    """ntk is not in transformers 5: check base' = base * s^(d/(d-2)) in float64, and that it equals HF's
    dynamic NTK with factor 1 evaluated at seq_len = s * max_position_embeddings (the same base change)."""
    for s, theta, prf in [(4.0, 10000.0, 1.0), (8.0, 500000.0, 0.5), (2.5, 10000.0, 1.0)]:
        ours, _ = _configs({"rope_type": "ntk", "factor": s}, theta, prf)
        inv, af = ROPE_INIT_FUNCTIONS["ntk"](ours, None)
        d = ours.rotary_dim
        i = torch.arange(d // 2, dtype=torch.float64)
        expected = 1.0 / (theta * s ** (d / (d - 2))) ** (2 * i / d)
        torch.testing.assert_close(inv.double(), expected, rtol=1e-6, atol=0)
        assert af == 1.0
        # lowest frequency stretched by exactly s, highest kept
        base_inv, _ = ROPE_INIT_FUNCTIONS["default"](ours, None)
        assert inv[0] == base_inv[0]
        assert float(base_inv[-1] / inv[-1]) == pytest.approx(s, rel=1e-5)
        _, hf = _configs({"rope_type": "dynamic", "factor": 1.0}, theta, prf)
        hf_inv, _ = HF_ROPE["dynamic"](hf, None, int(s * MAX_LEN))
        assert torch.equal(inv, hf_inv)


def test_dynamic_yarn_is_yarn_at_the_current_ratio():
    """dynamic_yarn (not in HF) at length l equals HF yarn with factor max(1, l / L)."""
    L = 16
    ours, _ = _configs(
        {"rope_type": "dynamic_yarn", "original_max_position_embeddings": L, "factor": 8.0}, 10000.0, 1.0
    )
    for seq_len in (None, 8, L, 40, 128):
        inv, af = ROPE_INIT_FUNCTIONS["dynamic_yarn"](ours, seq_len)
        s = max(1.0, (seq_len or 0) / L)
        _, hf = _configs(
            {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": L}, 10000.0, 1.0
        )
        hf_inv, hf_af = HF_ROPE["yarn"](hf, None, None)
        assert torch.equal(inv, hf_inv)
        assert af == hf_af
    assert {"dynamic", "dynamic_yarn", "longrope"} <= length_dependent_types()
    assert "yarn" not in length_dependent_types() and "linear" not in length_dependent_types()


@pytest.mark.parametrize(
    ("rope_scaling", "key"),
    [
        ({"rope_type": "linear"}, "factor"),
        ({"rope_type": "ntk"}, "factor"),
        ({"rope_type": "dynamic"}, "factor"),
        ({"rope_type": "yarn"}, "factor"),
        ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "low_freq_factor"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "high_freq_factor"),
        ({"rope_type": "longrope", "long_factor": [1.0] * 16}, "short_factor"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [1.0] * 3}, "long_factor"),
        ({"rope_type": "linear", "factor": "four"}, "factor"),
        ({"rope_type": "linear", "factor": 0.5}, "factor"),
        (
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0},
            "original_max_position_embeddings",
        ),
        ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 1.0, "beta_slow": 2.0}, "beta_fast"),
        (
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0},
            "high_freq_factor",
        ),
        ({"rope_type": "magic", "factor": 2.0}, "magic"),
    ],
)
def test_bad_rope_scaling_names_the_key(rope_scaling, key):
    # an unknown type is refused by the config itself, a bad value by the type's init function
    with pytest.raises(ConfigError, match=key):
        config = GPTConfig(
            n_head=N_HEAD, d_model=N_HEAD * HEAD_DIM, max_seq_len=MAX_LEN, rope_scaling=rope_scaling
        )
        RotaryPositions(config)


def test_unknown_key_warns_but_works():
    config = GPTConfig(
        n_head=N_HEAD,
        d_model=N_HEAD * HEAD_DIM,
        max_seq_len=MAX_LEN,
        rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fsat": 3},
    )
    with pytest.warns(UserWarning, match="beta_fsat"):
        pos = RotaryPositions(config)
    assert pos.attention_scaling == 1.0
    assert math.isclose(float(pos.inv_freq[0]), 0.5)
