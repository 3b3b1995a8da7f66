"""`extend`: the re-configured checkpoint keeps every weight bit for bit, carries the scaling in its config,
trains (full or LoRA, with S²-Attn) and merges; the LoRA merge and PEFT's own loader agree; the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from longctx.checkpoint import load_config, load_model, save_checkpoint
from longctx.cli import main
from longctx.config import GPTConfig
from longctx.errors import ConfigError
from longctx.extend import ExtendArgs, extend, extended_config
from longctx.extend.recipe import longlora
from longctx.model import GPT
from longctx.peft import apply_peft, lora_delta_norm, merged_copy, save_lora_adapter

L = 32
TINY = dict(vocab_size=260, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=L)


def _ckpt(tmp_path, name="base", **overrides) -> str:
    torch.manual_seed(0)
    path = tmp_path / name
    save_checkpoint(path, GPT(GPTConfig(**{**TINY, **overrides})))
    return str(path)


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(f"{path}/model.safetensors")


@pytest.mark.parametrize(
    "method", ["none", "linear", "ntk", "dynamic", "yarn", "dynamic_yarn", "longrope", "llama3"]
)
def test_steps_0_changes_no_weight_and_records_the_scaling(tmp_path, method):
    src = _ckpt(tmp_path)
    out = tmp_path / f"ext-{method}"
    extend(ExtendArgs.from_flat(ckpt=src, method=method, factor=4.0, seq_len=4 * L, steps=0, out=out))
    before, after = _weights(src), _weights(out)
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    config = load_config(out)
    if method == "none":
        assert config.rope_scaling is None and config.max_seq_len == 4 * L
    else:
        assert config.rope_scaling["rope_type"] == method
        assert config.rope_scaling["factor"] == 4.0
        assert config.rope_scaling["original_max_position_embeddings"] == L
        assert config.max_seq_len == (L if method == "dynamic" else 4 * L)
    assert config.extra["extension"]["method"] == method
    model = load_model(out)  # loads, and runs past the old length
    assert model(torch.randint(0, 260, (1, 4 * L))).shape == (1, 4 * L, 260)
    assert not (out / "optimizer.pt").exists()


def test_method_defaults_and_overrides():
    base = GPTConfig(**TINY)
    yarn = extended_config(base, "yarn", 8.0, 8 * L, {"beta_fast": 16.0, "mscale": 0.7})
    assert yarn.rope_scaling == {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": L,
        "beta_fast": 16.0,
        "beta_slow": 1.0,
        "mscale": 0.7,
    }
    llama3 = extended_config(base, "llama3", 8.0, 8 * L)
    assert (llama3.rope_scaling["low_freq_factor"], llama3.rope_scaling["high_freq_factor"]) == (1.0, 4.0)
    longrope = extended_config(base, "longrope", 8.0, 8 * L)
    n = base.rotary_dim // 2
    assert longrope.rope_scaling["short_factor"] == [1.0] * n
    # the default long factors reproduce YaRN's frequencies when long
    from longctx.positions.rope import ROPE_INIT_FUNCTIONS

    long_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](longrope, 8 * L)
    yarn_inv, _ = ROPE_INIT_FUNCTIONS["yarn"](extended_config(base, "yarn", 8.0, 8 * L), None)
    torch.testing.assert_close(long_inv, yarn_inv)
    # extending an extended model: factors stay relative to the original length
    twice = extended_config(yarn, "yarn", 16.0, 16 * L)
    assert twice.rope_scaling["original_max_position_embeddings"] == L


@pytest.mark.parametrize(
    ("position", "method", "error"),
    [
        ("learned", "yarn", "learned position table"),
        ("learned", "none", "learned position table"),
        ("alibi", "linear", "extrapolate"),
        ("sinusoidal", "yarn", "extrapolate"),
        ("rope", "magic", "unknown extension method"),
    ],
)
def test_unsuitable_method_is_a_config_error(position, method, error):
    with pytest.raises(ConfigError, match=error):
        extended_config(GPTConfig(**TINY, position=position), method, 2.0, 2 * L)


def test_bad_factor_and_longrope_lists():
    with pytest.raises(ConfigError, match="--factor"):
        extended_config(GPTConfig(**TINY), "linear", 0.5, L)
    config = extended_config(
        GPTConfig(**TINY), "longrope", 2.0, 2 * L, {"short_factor": [1.0], "long_factor": [2.0]}
    )
    with pytest.raises(ConfigError, match="list of 8 positive numbers"):
        GPT(config)


def test_learned_table_is_interpolated_and_nothing_else_changes(tmp_path):
    src = _ckpt(tmp_path, position="learned")
    out = tmp_path / "ext"
    extend(ExtendArgs.from_flat(ckpt=src, method="linear", factor=4.0, seq_len=4 * L, steps=0, out=out))
    before, after = _weights(src), _weights(out)
    for k in before:
        if k != "positions.table.weight":
            assert torch.equal(before[k], after[k]), k
    old, new = before["positions.table.weight"], after["positions.table.weight"]
    assert new.shape == (4 * L, old.shape[1])
    torch.testing.assert_close(new[0], old[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(new[-1], old[-1], rtol=0, atol=1e-6)
    assert load_config(out).max_seq_len == 4 * L


def test_alibi_extends_as_is(tmp_path):
    src = _ckpt(tmp_path, position="alibi")
    extend(
        ExtendArgs.from_flat(
            ckpt=src, method="none", factor=4.0, seq_len=4 * L, steps=0, out=tmp_path / "ext"
        )
    )
    assert all(torch.equal(a, b) for a, b in zip(_weights(src).values(), _weights(tmp_path / "ext").values()))
    assert load_config(tmp_path / "ext").max_seq_len == 4 * L


def extend_flat(**values):
    return extend(ExtendArgs.from_flat(**values))


def _lora_model(seed: int = 0) -> tuple[GPT, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_peft(model, longlora())
    with torch.no_grad():  # B = 0 at init: make the adapters (and the trained norms) do something
        for name, p in model.named_parameters():
            if "lora_B" in name or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval(), base_state


def test_lora_merge_gives_the_unmerged_logits():
    model, _ = _lora_model()
    assert lora_delta_norm(model) > 0
    ids = torch.randint(0, 260, (2, 3 * L))
    with torch.no_grad():
        unmerged = model(ids)
        merged_model = merged_copy(model)
        merged = merged_model(ids)
    assert type(merged_model) is GPT and not any("lora" in k for k in merged_model.state_dict())
    assert set(merged_model.state_dict()) == set(GPT(model.config).state_dict())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the source model still has its adapters (training can go on)
        torch.testing.assert_close(model(ids), unmerged)


def test_lora_trains_adapters_embeddings_and_norms_only():
    model, _ = _lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert (
        any("lora_A" in n for n in trainable) and "tok_emb.weight" in trainable and "norm.weight" in trainable
    )
    assert not any(
        n.endswith(("q_proj.base_layer.weight", "up_proj.weight", "down_proj.weight")) for n in trainable
    )


def test_saved_adapter_loads_with_peft_and_matches_the_merge(tmp_path):
    peft = pytest.importorskip("peft")
    model, base_state = _lora_model()
    save_lora_adapter(model, tmp_path / "adapter", base_model="base")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.blocks.0.attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.tok_emb.weight" in keys
    # PEFT's own loader onto the untouched base model
    base = GPT(model.config)
    base.load_state_dict(base_state)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 260, (1, 2 * L))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), merged_copy(model)(ids), rtol=1e-5, atol=1e-5)


def test_short_extend_with_lora_s2_attn_and_adapter(tmp_path, small_corpus, cache_dir):
    src = _ckpt(tmp_path)
    out = tmp_path / "ext"
    r = extend_flat(
        ckpt=src,
        method="yarn",
        factor=4.0,
        seq_len=4 * L,
        steps=3,
        out=out,
        lora=True,
        keep_adapter=True,
        s2_attn=True,
        data=small_corpus,
        batch_size=2,
        cache_dir=cache_dir,
        quiet=True,
        eval_batches=1,
        warmup=1,
    )
    assert len([h for h in r.history if "loss" in h]) == 3
    config = load_config(out)
    assert config.rope_scaling["rope_type"] == "yarn" and config.max_seq_len == 4 * L
    assert config.extra["extension"]["lora"] is True
    weights = _weights(out)
    assert not any("lora" in k for k in weights)
    before = _weights(src)
    assert not torch.equal(weights["blocks.0.attn.q_proj.weight"], before["blocks.0.attn.q_proj.weight"])
    assert torch.equal(
        weights["blocks.0.mlp.up_proj.weight"], before["blocks.0.mlp.up_proj.weight"]
    )  # frozen
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    model = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.arange(64)[None]), r.model.cpu()(torch.arange(64)[None]))
    # the Hugging Face pair: transformers base + PEFT adapter gives the merged model's logits
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf-base")
    hf = PeftModel.from_pretrained(hf, out / "hf-adapter").eval()
    with torch.no_grad():
        ids = torch.arange(64)[None]
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)


def test_short_full_extend(tmp_path, small_corpus, cache_dir):
    src = _ckpt(tmp_path)
    r = extend_flat(
        ckpt=src,
        method="linear",
        factor=2.0,
        seq_len=2 * L,
        steps=2,
        out=tmp_path / "ext",
        data=small_corpus,
        batch_size=2,
        cache_dir=cache_dir,
        quiet=True,
        eval_batches=1,
        warmup=1,
    )
    assert r.final_val_loss is not None
    after, before = _weights(tmp_path / "ext"), _weights(src)
    assert not torch.equal(after["blocks.0.mlp.up_proj.weight"], before["blocks.0.mlp.up_proj.weight"])
    assert load_config(tmp_path / "ext").rope_scaling == {
        "rope_type": "linear",
        "factor": 2.0,
        "original_max_position_embeddings": L,
    }


def test_cli(tmp_path, capsys):
    src = _ckpt(tmp_path)
    out = tmp_path / "cli"
    assert (
        main(
            [
                "extend",
                src,
                "--method",
                "yarn",
                "--seq-len",
                str(8 * L),
                "--steps",
                "0",
                "--out",
                str(out),
                "--rope-json",
                '{"beta_fast": 16}',
            ]
        )
        == 0
    )
    config = load_config(out)
    assert config.rope_scaling["factor"] == 8.0 and config.rope_scaling["beta_fast"] == 16
    assert "rope_scaling" in capsys.readouterr().out
    assert (
        main(
            [
                "extend",
                src,
                "--method",
                "yarn",
                "--seq-len",
                "64",
                "--steps",
                "0",
                "--out",
                str(out),
                "--rope-json",
                "{bad",
            ]
        )
        == 2
    )
    assert "--rope-json" in capsys.readouterr().err
    assert (
        main(
            [
                "extend",
                src,
                "--method",
                "linear",
                "--seq-len",
                "64",
                "--steps",
                "0",
                "--out",
                str(out),
                "--keep-adapter",
            ]
        )
        == 2
    )
    assert "--lora" in capsys.readouterr().err
