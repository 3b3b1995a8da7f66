"""A new RoPE scaling or attention backend is one registry record, and every part of longctx sees it:
extension, Hugging Face import and export, config validation."""

from __future__ import annotations

import pytest
import torch

from longctx.attention import BACKENDS, register_backend
from longctx.attention.sdpa import sdpa_attention
from longctx.checkpoint import export_to_hf, hf_config, load_config
from longctx.config import GPTConfig
from longctx.errors import ConfigError
from longctx.extend import ExtendArgs, extend, methods
from longctx.interop.hf import config_from_hf_dict, hf_config_dict, hf_rope_types
from longctx.model import GPT
from longctx.positions.rope import ROPE_TYPES, RopeType, linear_rope, register_rope_type

TINY = dict(vocab_size=64, n_layer=1, n_head=2, d_model=32, d_ff=64, max_seq_len=32)


@pytest.fixture
def half_linear():
    """'half_linear': position interpolation by factor/2, known to HF (in this test) as 'x_half'."""

    def init(config, seq_len=None):
        inv, af = linear_rope(config.replace(rope_scaling={"rope_type": "linear", "factor": 1.0}))
        return inv / (config.rope_scaling["factor"] / 2), af

    register_rope_type(RopeType("half_linear", init, extend={"note": 1.0}, hf="x_half", summary="PI by s/2"))
    yield
    del ROPE_TYPES["half_linear"]


def test_a_rope_type_is_one_record(half_linear, tmp_path):
    # config validation asks the registry
    config = GPTConfig(**TINY, rope_scaling={"rope_type": "half_linear", "factor": 4.0})
    with pytest.raises(ConfigError, match="unknown rope_scaling type"):
        GPTConfig(**TINY, rope_scaling={"rope_type": "third_linear", "factor": 4.0})
    # the model rotates with it: half the factor is the linear scaling with factor 2
    linear = GPT(GPTConfig(**TINY, rope_scaling={"rope_type": "linear", "factor": 2.0})).positions
    torch.testing.assert_close(GPT(config).positions.inv_freq, linear.inv_freq)
    # extend offers it and writes its defaults
    assert "half_linear" in methods()
    src = tmp_path / "src"
    from longctx.checkpoint import save_checkpoint

    save_checkpoint(src, GPT(GPTConfig(**TINY)))
    extend(
        ExtendArgs.from_flat(
            ckpt=str(src), method="half_linear", seq_len=128, steps=0, out=str(tmp_path / "e")
        )
    )
    scaling = load_config(tmp_path / "e").rope_scaling
    assert scaling["rope_type"] == "half_linear" and scaling["factor"] == 4.0 and scaling["note"] == 1.0
    # HF import and export use its HF name
    assert hf_rope_types()["x_half"] == "half_linear"
    d = hf_config_dict(config)
    assert d["rope_scaling"]["rope_type"] == "x_half" and d["rope_parameters"]["rope_type"] == "x_half"
    assert config_from_hf_dict(d).rope_scaling["rope_type"] == "half_linear"
    export_to_hf(GPT(config), tmp_path / "hf")
    assert hf_config(tmp_path / "hf").rope_type == "half_linear"


def test_a_registered_backend_is_chosen_from_a_config():
    calls = []

    def counting(q, k, v, **kw):
        calls.append(q.shape)
        return sdpa_attention(q, k, v, **kw)

    register_backend("counting", counting)
    try:
        config = GPTConfig(**TINY, attn_backend="counting")
        torch.manual_seed(0)
        model = GPT(config).eval()
        ids = torch.randint(0, 64, (2, 16))
        with torch.no_grad():
            out = model(ids)
        assert len(calls) == config.n_layer and calls[0] == (2, 2, 16, 16)
        plain = GPT(config.replace(attn_backend="sdpa")).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(out, plain(ids))
    finally:
        del BACKENDS["counting"]
    with pytest.raises(ConfigError, match="unknown attention backend 'counting'"):
        GPTConfig(**TINY, attn_backend="counting")
