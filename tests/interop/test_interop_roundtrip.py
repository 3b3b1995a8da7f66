"""HF -> longctx -> HF: the same bits, an equivalent config, a quiet load in transformers; sharded and .bin
checkpoints, both rope key layouts, unsupported architectures, Mistral's sliding window, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from interop_helpers import FAMILIES, load_quietly, make_hf, transformers
from safetensors.torch import load_file

from longctx.checkpoint import export_to_hf, import_from_hf, load_model
from longctx.checkpoint import hf_config as config_from_hf
from longctx.cli import main
from longctx.errors import CheckpointError

# keys transformers fills per save/load, not part of what the model is
_VOLATILE = {"transformers_version", "_name_or_path"}


def _hf_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _config(path) -> dict:
    d = transformers.AutoConfig.from_pretrained(str(path)).to_dict()
    return {k: v for k, v in d.items() if k not in _VOLATILE}


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


@pytest.mark.parametrize(
    ("family", "rope_type", "dtype"),
    [
        ("llama", "llama3", torch.float32),
        ("mistral", "yarn", torch.float32),
        ("qwen2", "longrope", torch.bfloat16),
    ],
)
def test_round_trip_is_bit_identical(tmp_path, family, rope_type, dtype):
    src, ours, out = tmp_path / "src", tmp_path / "ours", tmp_path / "out"
    make_hf(src, family, rope_type, dtype=dtype)
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    import_from_hf(src, ours)
    assert (ours / "chat_template.jinja").exists()
    export_to_hf(ours, out)

    _assert_same_tensors(_hf_tensors(src), _hf_tensors(out))
    assert _config(src) == _config(out)
    reloaded, complaints = load_quietly(out)
    assert complaints == []
    original, _ = load_quietly(src)  # not `hf`: .to(bfloat16) also rounded its RoPE tables
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, rtol=0, atol=0)
    assert (out / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()


def test_export_writes_both_rope_layouts(tmp_path):
    make_hf(tmp_path / "src", "llama", "yarn")
    export_to_hf(tmp_path / "src", tmp_path / "out")
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert d["architectures"] == ["LlamaForCausalLM"]
    assert d["rope_scaling"]["rope_type"] == d["rope_parameters"]["rope_type"] == "yarn"  # transformers 4 / 5
    assert d["rope_theta"] == d["rope_parameters"]["rope_theta"]
    assert {k: v for k, v in d["rope_parameters"].items() if k != "rope_theta"} == d["rope_scaling"]


@pytest.mark.parametrize(
    "legacy",
    [
        {"type": "dynamic", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ],
)
def test_transformers4_rope_layout(tmp_path, legacy):
    """Configs written by transformers 4 (`rope_scaling` with `type` or `rope_type`, top-level
    `rope_theta`) mean to us what they mean to transformers 5."""
    make_hf(tmp_path, "llama")
    d = json.loads((tmp_path / "config.json").read_text())
    del d["rope_parameters"]
    d.update(rope_scaling=legacy, rope_theta=5e5)
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ours = load_model(tmp_path)
    assert ours.config.rope_theta == 5e5 and ours.config.rope_type == legacy.get(
        "type", legacy.get("rope_type")
    )
    ids = torch.randint(0, 300, (1, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf(tmp_path, "qwen2", max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(
        list(tmp_path.glob("*.safetensors"))
    ) > 2
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(ids), hf(ids).logits, rtol=0, atol=1e-5)
    export_to_hf(tmp_path, tmp_path / "out", max_shard_bytes=40_000)  # our shards load in transformers
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    reloaded, complaints = load_quietly(tmp_path / "out")
    assert complaints == []
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, rtol=0, atol=0)


def test_pytorch_bin_loads_with_weights_only(tmp_path):
    hf = make_hf(tmp_path, "llama")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(ids), hf(ids).logits, rtol=0, atol=1e-5)

    class Payload:  # a pickle that would run code: refused, not executed
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model.norm.weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(tmp_path)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64})
    )
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel.*LlamaForCausalLM.*MistralForCausalLM.*Qwen2"):
        load_model(tmp_path)
    assert main(["info", str(tmp_path)]) == 2  # the CLI: one line, exit 2


def test_unsupported_hf_options_are_refused(tmp_path):
    make_hf(tmp_path, "llama", hidden_act="gelu")
    with pytest.raises(CheckpointError, match="hidden_act"):
        config_from_hf(tmp_path)
    make_hf(tmp_path, "llama", attention_bias=True)
    with pytest.raises(CheckpointError, match="attention_bias"):
        config_from_hf(tmp_path)


def test_llama_with_biases(tmp_path):
    hf = make_hf(tmp_path / "src", "llama", attention_bias=True, mlp_bias=True)
    ours = load_model(tmp_path / "src")
    assert ours.config.bias
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-5)
    export_to_hf(ours, tmp_path / "out")
    _assert_same_tensors(_hf_tensors(tmp_path / "src"), _hf_tensors(tmp_path / "out"))


def test_sliding_window_is_reported_and_dropped(tmp_path):
    """Mistral with a window shorter than its context: longctx attends to everything, says so at import,
    and exports without the window so transformers computes the same thing at every length."""
    make_hf(tmp_path / "src", "mistral", sliding_window=16)
    with pytest.warns(UserWarning, match="sliding_window=16"):
        model = load_model(tmp_path / "src")
    export_to_hf(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["sliding_window"] is None
    hf, complaints = load_quietly(tmp_path / "out")
    assert complaints == []
    ids = torch.randint(0, 300, (1, 40))  # longer than the window
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)
    export_to_hf(model, tmp_path / "kept", keep_sliding_window=True)
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["sliding_window"] == 16


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cli_convert_both_ways(tmp_path, family, capsys):
    hf = make_hf(tmp_path / "src", family)
    assert main(["convert", "from-hf", str(tmp_path / "src"), str(tmp_path / "ours")]) == 0
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["model_type"] == "longctx" and cfg["extra"]["hf_model_type"] == family
    assert main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "out")]) == 0
    reloaded, complaints = load_quietly(tmp_path / "out")
    assert complaints == []
    assert type(reloaded) is type(hf)
    assert main(["convert", "to-hf", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
