"""longctx's own checkpoints (byte tokenizer, tiny configs) export to transformers; options Llama cannot
express are refused by name; LoRA adapters export in PEFT's layout and give the same logits under peft."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from interop_helpers import load_quietly, make_hf, transformers

from longctx import GPT, GPTConfig
from longctx.checkpoint import export_to_hf, load_model, save_checkpoint
from longctx.errors import ConfigError
from longctx.interop.hf import hf_module_path
from longctx.peft import save_lora_adapter
from longctx.positions.rope import ROPE_INIT_FUNCTIONS


def _native(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", n_layer=2, init_std=0.1, **overrides)
    return GPT(cfg).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_kv_head": 2, "tie_embeddings": False, "rope_theta": 5e5},
        {"qkv_bias": True},  # -> Qwen2, the family with q/k/v-only biases
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 64}},
        {"rope_scaling": {"rope_type": "ntk", "factor": 4.0}},  # -> default with a larger rope_theta
    ],
    ids=["tied", "gqa-untied", "qkv-bias", "yarn", "linear", "ntk"],
)
def test_native_checkpoint_exports(tmp_path, overrides):
    rope_type = (overrides.get("rope_scaling") or {}).get("rope_type", "default")
    if rope_type not in ROPE_INIT_FUNCTIONS:
        pytest.skip(f"rope type {rope_type} not in longctx.positions.rope yet")
    model = _native(**overrides)
    with torch.no_grad():  # biases are zero at init: give them something to carry
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    save_checkpoint(tmp_path / "ckpt", model)  # with the byte tokenizer
    export_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf, complaints = load_quietly(tmp_path / "hf")
    assert complaints == []
    assert hf.config.architectures == ["Qwen2ForCausalLM" if "qkv_bias" in overrides else "LlamaForCausalLM"]
    assert hf.config.eos_token_id == 256  # the byte tokenizer's <|endoftext|>
    ids = torch.randint(0, 260, (1, 300))  # past max_seq_len=256
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-4)
    if not overrides:
        tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
        assert tok("héllo")["input_ids"] == list("héllo".encode())


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"norm": "layernorm"}, "norm='layernorm'"),
        ({"mlp": "gelu"}, "mlp='gelu'"),
        ({"position": "alibi"}, "position='alibi'"),
        ({"position": "learned"}, "position='learned'"),
        ({"causal": False}, "causal=False"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ],
)
def test_options_llama_lacks_are_refused_by_name(tmp_path, overrides, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        export_to_hf(_native(**overrides), tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_family_must_fit_the_biases(tmp_path):
    with pytest.raises(ConfigError, match="qkv_bias"):
        export_to_hf(_native(qkv_bias=True), tmp_path, architecture="mistral")
    with pytest.raises(ConfigError, match="bias=True"):
        export_to_hf(_native(bias=True), tmp_path, architecture="qwen2")


def test_lora_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    hf_dir = tmp_path / "hf"
    make_hf(hf_dir, "llama", "yarn")
    ours = load_model(hf_dir)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft.inject_adapter_in_model(lora, ours)
    torch.manual_seed(3)
    ours.tok_emb.requires_grad_(True)  # trained in full next to the adapters, as LongLoRA does
    ours.blocks[1].attn_norm.requires_grad_(True)
    with torch.no_grad():  # lora_B starts at zero: make the adapter change the function
        for name, p in ours.named_parameters():
            if "lora_B" in name or name in ("tok_emb.weight", "blocks.1.attn_norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
    ids = torch.randint(0, 300, (1, 48))
    with torch.no_grad():
        expected = ours(ids)
    with pytest.raises(ConfigError, match="LoRA"):
        export_to_hf(ours, tmp_path / "refused")

    save_lora_adapter(ours, tmp_path / "adapter", base_model=str(hf_dir), name_map=hf_module_path)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"] and cfg["r"] == 4
    assert sorted(cfg["modules_to_save"]) == ["model.embed_tokens", "model.layers.1.input_layernorm"]
    base, _ = load_quietly(hf_dir)
    with torch.no_grad():
        base_logits = base(ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert [str(w.message) for w in caught if "key" in str(w.message).lower()] == []  # no missing/unexpected
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert (got - base_logits).abs().max() > 0.1  # the adapter is really applied

    # merged and base-only exports of the same LoRA model
    export_to_hf(ours, tmp_path / "merged", lora="merge")
    merged, complaints = load_quietly(tmp_path / "merged")
    assert complaints == []
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-4)
