"""`extend`: take a checkpoint trained at length L, re-configure its positions for seq_len = s·L, fine-tune
(or not), and write a checkpoint whose config carries the scaling, so eval, generate, serve and HF export
all use the same positions.

What each method writes into the new config (L = the checkpoint's trained length):

    RoPE models
      none          positions unchanged; max_seq_len = seq_len (plain extrapolation, or just train longer)
      linear        rope_scaling {"rope_type": "linear", "factor": s}            position interpolation
      ntk           {"rope_type": "ntk", "factor": s}                            base * s^(d/(d-2))
      dynamic       {"rope_type": "dynamic", "factor": s}; max_seq_len stays L   (HF scales from it)
      yarn          {"rope_type": "yarn", "factor": s, "beta_fast": 32, "beta_slow": 1}
      dynamic_yarn  {"rope_type": "dynamic_yarn", ...}                           s = max(1, len / L)
      longrope      {"rope_type": "longrope", "short_factor": [...], "long_factor": [...], "factor": s}
      llama3        {"rope_type": "llama3", "factor": s, "low_freq_factor": 1, "high_freq_factor": 4}
    every one also records "original_max_position_embeddings": L; `rope_params` adds or overrides keys.
    learned       linear: the position table is interpolated to seq_len rows (the only option)
    alibi, sinusoidal, none (NoPE): none: defined at every position, they extrapolate as they are

No weight changes (except the interpolated learned table): with steps=0 the new checkpoint holds exactly
the old tensors under a new config.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longctx.checkpoint import load_config, load_model, load_state, save_checkpoint
from longctx.config import GPTConfig
from longctx.data.tokenizer import load_tokenizer
from longctx.errors import ConfigError, LongctxError
from longctx.model import GPT
from longctx.positions import build_positions
from longctx.positions.rope import ROPE_INIT_FUNCTIONS

ROPE_METHODS = ("none", "linear", "ntk", "dynamic", "yarn", "dynamic_yarn", "longrope", "llama3")
METHODS = ROPE_METHODS  # `learned` models take `linear`; alibi/sinusoidal/NoPE take `none`
# learning rates when none is given: the small models of this project, not a 7B (LongLoRA/YaRN use 2e-5)
DEFAULT_LR = {"full": 2e-4, "lora": 1e-3}


@dataclass
class ExtendResult:
    model: GPT
    out_dir: Path
    config: GPTConfig
    history: list[dict[str, Any]]
    final_val_loss: float | None


def _rope_scaling(
    method: str, factor: float, L: int, config: GPTConfig, rope_params: dict[str, Any]
) -> dict[str, Any] | None:
    """The rope_scaling dict for `method` (HF layout), defaults first, then the user's keys."""
    scaling: dict[str, Any] = {
        "rope_type": method,
        "factor": float(factor),
        "original_max_position_embeddings": L,
    }
    if method in ("yarn", "dynamic_yarn"):
        scaling.update(beta_fast=32.0, beta_slow=1.0)
    elif method == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    elif method == "longrope" and not {"short_factor", "long_factor"} <= set(rope_params):
        scaling.update(_longrope_from_yarn(config, factor, L))
    scaling.update(rope_params)
    scaling.pop("type", None)
    return scaling


def _longrope_from_yarn(config: GPTConfig, factor: float, L: int) -> dict[str, list[float]]:
    """A starting point when no searched factors are given: short = 1 (the original RoPE up to L), long =
    YaRN's per-dimension interpolation ratios (NTK-by-parts), which LongRoPE's search starts from."""
    yarn = config.replace(
        rope_scaling={"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": L}
    )
    base, _ = ROPE_INIT_FUNCTIONS["default"](config, None)
    inv, _ = ROPE_INIT_FUNCTIONS["yarn"](yarn, None)
    n = config.rotary_dim // 2
    return {"short_factor": [1.0] * n, "long_factor": [float(x) for x in (base / inv).tolist()]}


def extended_config(
    config: GPTConfig, method: str, factor: float, seq_len: int, rope_params: dict[str, Any] | None = None
) -> GPTConfig:
    """The re-configured GPTConfig for `method` at `seq_len` (see the module docstring)."""
    rope_params = dict(rope_params or {})
    if seq_len <= 0:
        raise ConfigError(f"--seq-len must be positive, got {seq_len}")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1):
        raise ConfigError(
            f"--factor must be a number >= 1 (the extension ratio, e.g. 8 for 256 -> 2048), got {factor}"
        )
    if method not in METHODS:
        raise ConfigError(f"unknown extension method {method!r}; choose one of {', '.join(METHODS)}")
    extra = {**config.extra}
    new = {"max_seq_len": seq_len, "extra": extra}
    if config.position == "rope":
        # an already-scaled model is re-scaled from its original length: factors stay relative to L
        old = config.rope_scaling or {}
        L = int(old.get("original_max_position_embeddings", config.max_seq_len))
        if method != "none":
            new["rope_scaling"] = _rope_scaling(method, factor, L, config, rope_params)
            if method == "dynamic":  # HF's dynamic NTK measures the length from max_position_embeddings
                new["max_seq_len"] = L
        elif rope_params:
            raise ConfigError("--rope-json goes with a scaling method; --method none keeps the positions")
    elif config.position == "learned":
        if method != "linear":
            raise ConfigError(
                f"a learned position table cannot extrapolate; extend it with --method linear "
                f"(the table is interpolated to {seq_len} rows), not {method!r}"
            )
        L = config.max_seq_len
    else:
        if method != "none":
            raise ConfigError(
                f"{config.position!r} positions are defined at every position and extrapolate as "
                f"they are: use --method none (it trains at --seq-len), not {method!r}"
            )
        L = config.max_seq_len
    extra["extension"] = {
        "method": method,
        "factor": float(factor),
        "original_max_seq_len": L,
        "seq_len": seq_len,
    }
    return config.replace(**new)


def reconfigure(model: GPT, config: GPTConfig) -> GPT:
    """A new GPT with `config`'s positions holding `model`'s weights unchanged (a learned table is
    interpolated to the new length)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if config.position == "learned" and config.max_seq_len != model.config.max_seq_len:
        table = build_positions(model.config)
        table.table.weight.data.copy_(state["positions.table.weight"])
        table.interpolate_to(config.max_seq_len)
        state["positions.table.weight"] = table.table.weight.data
    device = model.head_weight.device
    with torch.device("meta"):  # no random init: every parameter is overwritten below
        new = GPT(config)
    new = new.to_empty(device=device)
    # positions hold non-persistent buffers (RoPE inv_freq, ALiBi slopes) that no state dict carries
    new.positions = build_positions(config).to(device)
    load_state(new, state, source="the source checkpoint")
    return new


def extend(
    ckpt: str | Path,
    method: str,
    factor: float,
    seq_len: int,
    steps: int,
    out: str | Path,
    *,
    lora: bool = False,
    keep_adapter: bool = False,
    s2_attn: bool = False,
    data: str | None = None,
    lr: float | None = None,
    batch_size: int = 4,
    seed: int = 0,
    device: str = "auto",
    rope_params: dict[str, Any] | None = None,
    lora_r: int = 8,
    lora_alpha: int = 16,
    **train_opts: Any,
) -> ExtendResult:
    """Extend `ckpt` to `seq_len` with `method` and fine-tune `steps` steps (0: only re-configure)."""
    if keep_adapter and not lora:
        raise ConfigError("--keep-adapter needs --lora (there is no adapter to keep otherwise)")
    if steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {steps}")
    config = extended_config(load_config(ckpt), method, factor, seq_len, rope_params)
    if s2_attn and (config.position == "alibi" or not config.causal):
        raise ConfigError("--s2-attn is for causal models without ALiBi; drop --s2-attn")
    tokenizer = load_tokenizer(ckpt)
    model = reconfigure(load_model(ckpt), config)
    info = config.extra["extension"]
    info.update(steps=steps, lora=lora, s2_attn=s2_attn, source=str(ckpt))
    out = Path(out)
    if steps == 0:
        save_checkpoint(out, model, tokenizer)
        return ExtendResult(model=model, out_dir=out, config=config, history=[], final_val_loss=None)

    from longctx.extend import lora as lora_mod
    from longctx.train.trainer import TrainArgs, train

    export = None
    if lora:
        lora_mod.add_lora(model, lora_mod.lora_config(r=lora_r, alpha=lora_alpha))
        export = lora_mod.merged_copy
    args = TrainArgs(
        data=data,
        seq_len=seq_len,
        steps=steps,
        batch_size=batch_size,
        lr=lr if lr is not None else DEFAULT_LR["lora" if lora else "full"],
        seed=seed,
        device=device,
        out=str(out),
        **train_opts,
    )
    s2 = contextlib.nullcontext()
    if s2_attn:
        from longctx.extend.s2attn import group_size, use_s2_attention

        group_size(seq_len, 0.25)  # fail before training if the length cannot be grouped
        s2 = use_s2_attention()
    with s2:
        result = train(args, model=model, tokenizer=tokenizer, export_model=export)
    if keep_adapter:
        lora_mod.save_adapter(model, out / "adapter", base_model=str(ckpt))
        _export_hf_adapter(model, out, ckpt)
        (out / "adapter" / "longctx_base_config.json").write_text(
            json.dumps(config.to_dict(), indent=2) + "\n"
        )
    return ExtendResult(
        model=result.model,
        out_dir=out,
        config=config,
        history=result.history,
        final_val_loss=result.final_val_loss,
    )


def _export_hf_adapter(model: GPT, out: Path, ckpt: str | Path) -> None:
    """Also give the adapter to Hugging Face users: `OUT/hf-base` (the un-merged base weights with the new
    positions, a transformers directory) and `OUT/hf-adapter` (PEFT format with HF module names), so that
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT/hf-base), OUT/hf-adapter)` works.
    Skipped with a note when the model cannot be exported (e.g. ALiBi, LayerNorm: not Llama-shaped)."""
    from longctx.interop import export_lora_adapter, export_to_hf

    try:
        export_to_hf(model, out / "hf-base", tokenizer_dir=out, lora="base")
    except LongctxError as e:
        print(f"note: no Hugging Face adapter export ({e})")
        return
    export_lora_adapter(model, out / "hf-adapter", base_model_name_or_path=str(out / "hf-base"))
