"""`extend`: take a checkpoint trained at length L, re-configure its positions for seq_len = s·L, fine-tune
(or not), and write a checkpoint whose config carries the scaling, so eval, generate, serve and HF export
all use the same positions.

What each method writes into the new config (L = the checkpoint's trained length):

    RoPE models
      none          positions unchanged; max_seq_len = seq_len (plain extrapolation, or just train longer)
      every RoPE type registered with extension defaults (`longctx.positions.rope.ROPE_TYPES`, e.g.
      linear, ntk, dynamic, yarn, dynamic_yarn, longrope, llama3): rope_scaling {"rope_type": M,
      "factor": s, "original_max_position_embeddings": L, + the type's defaults (yarn: beta_fast 32,
      beta_slow 1; llama3: low/high_freq_factor 1/4; longrope: factors from YaRN when none are given)};
      `rope_params` adds or overrides keys. dynamic keeps max_seq_len = L (HF scales from it).
    learned       linear: the position table is interpolated to seq_len rows (the only option)
    alibi, sinusoidal, none (NoPE): none: defined at every position, they extrapolate as they are

No weight changes (except the interpolated learned table): with steps=0 the new checkpoint holds exactly
the old tensors under a new config.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longctx.attention.context_methods import METHODS, method_names, method_spec
from longctx.checkpoint import (
    empty_model,
    load_config,
    load_model,
    load_state,
    load_tokenizer,
    save_checkpoint,
)
from longctx.config import GPTConfig
from longctx.errors import ConfigError, LongctxError
from longctx.model import GPT
from longctx.peft import PeftSpec, apply_peft, merged_copy, save_lora_adapter
from longctx.positions import build_positions
from longctx.positions.rope import ROPE_TYPES
from longctx.train.spec import LoopSpec, OptimizerSpec, embedded, from_flat


def methods() -> tuple[str, ...]:
    """`none`, every registered RoPE type with extension defaults (`learned` models take `linear`;
    alibi/sinusoidal/NoPE take `none`) and every training-free context method (self-extend, ...)."""
    rope = tuple(name for name, r in ROPE_TYPES.items() if r.extend is not None)
    return ("none", *rope, *method_names())


def method_help() -> str:
    parts = ["none (train longer, positions as they are)"]
    parts += [
        f"{n} ({ROPE_TYPES[n].summary})" if ROPE_TYPES[n].summary else n for n in ROPE_TYPES if n in methods()
    ]
    parts += [f"{n} (training-free: {METHODS[n.replace('-', '_')].summary})" for n in method_names()]
    return ", ".join(parts)


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
        **ROPE_TYPES[method].extension_keys(config, factor, L, rope_params),
        **rope_params,
    }
    scaling.pop("type", None)
    return scaling


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
    if method.replace("_", "-") in method_names():  # a training-free context method on top of the RoPE
        return _context_config(config, method, factor, seq_len, rope_params)
    if method not in methods():
        raise ConfigError(f"unknown extension method {method!r}; choose one of {', '.join(methods())}")
    extra = {**config.extra}
    new = {"max_seq_len": seq_len, "extra": extra}
    if config.position == "rope":
        # an already-scaled model is re-scaled from its original length: factors stay relative to L
        old = config.rope_scaling or {}
        L = int(old.get("original_max_position_embeddings", config.max_seq_len))
        if method != "none":
            new["rope_scaling"] = _rope_scaling(method, factor, L, config, rope_params)
            if ROPE_TYPES[method].keeps_max_len:  # e.g. HF's dynamic NTK scales from max_position_embeddings
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


def _context_config(
    config: GPTConfig, method: str, factor: float, seq_len: int, params: dict[str, Any]
) -> GPTConfig:
    """A context method keeps the weights, the RoPE (with any scaling, as DCA combines with PI/YaRN) and the
    trained length; the method is recorded and reaches `seq_len`."""
    if config.position != "rope":
        raise ConfigError(f"{method} remaps RoPE positions; this model's positions are {config.position!r}")
    L = config.max_seq_len
    spec = method_spec(method, L, factor, **params)
    new = config.replace(context_method=spec, extra={**config.extra})
    if new.context_length < seq_len:
        raise ConfigError(
            f"{method} with {json.dumps({k: v for k, v in spec.items() if k != 'type'})} reaches "
            f"{new.context_length} tokens, short of --seq-len {seq_len}; raise --factor or the group size"
        )
    new.extra["extension"] = {"method": spec["type"], "factor": float(factor), "original_max_seq_len": L,
                              "seq_len": seq_len}  # fmt: skip
    return new


def reconfigure(model: GPT, config: GPTConfig) -> GPT:
    """A new GPT with `config`'s positions holding `model`'s weights unchanged (a learned table is
    interpolated to the new length)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if config.position == "learned" and config.max_seq_len != model.config.max_seq_len:
        table = build_positions(model.config)
        table.table.weight.data.copy_(state["positions.table.weight"])
        table.interpolate_to(config.max_seq_len)
        state["positions.table.weight"] = table.table.weight.data
    new = empty_model(config, model.head_weight.device)  # every parameter is overwritten below
    load_state(new, state, source="the source checkpoint")
    return new


@dataclass
class ExtendArgs:
    """`longctx extend`: the method and target, the fine-tune's data, and the shared optimizer and loop specs
    (`lr` None: 2e-4 for a full fine-tune, 1e-3 with LoRA: the small models of this project, not a 7B)."""

    ckpt: str = ""
    method: str = "yarn"
    seq_len: int = 0  # the new context length (and the fine-tune's training length)
    factor: float | None = None  # None: seq_len / the checkpoint's trained length
    rope_params: dict[str, Any] = field(default_factory=dict)  # extra or overriding rope_scaling keys
    lora: bool = False  # LoRA on q/k/v/o + trainable embeddings and norms (LongLoRA), merged at the end
    lora_r: int = 8
    lora_alpha: float = 16.0
    keep_adapter: bool = False  # with lora: also save the adapter in PEFT's format (ours and HF's)
    s2_attn: bool = False  # LongLoRA's shifted sparse attention while training
    data: str | None = None  # the fine-tune's corpus (default: the embedded one)
    batch_size: int = 4
    cache_dir: str | None = None
    optim: OptimizerSpec = embedded(lambda: OptimizerSpec(lr=None), OptimizerSpec)
    loop: LoopSpec = embedded(lambda: LoopSpec(out="runs/extend"), LoopSpec)

    @classmethod
    def from_flat(cls, **values: Any) -> ExtendArgs:
        return from_flat(cls, values)

    def validate(self) -> None:
        if self.keep_adapter and not self.lora:
            raise ConfigError("--keep-adapter needs --lora (there is no adapter to keep otherwise)")
        if not self.ckpt:
            raise ConfigError("extend needs a checkpoint (CKPT)")
        self.loop.validate()


def longlora(r: int = 8, alpha: float = 16.0) -> PeftSpec:
    """LongLoRA's recipe: rank 8, alpha 16, dropout 0.05 on q/k/v/o, embeddings and norms trained in full."""
    return PeftSpec("lora", lora_r=r, lora_alpha=alpha, lora_dropout=0.05, train_embeddings_and_norms=True)


def extend(args: ExtendArgs) -> ExtendResult:
    """Extend `args.ckpt` to `args.seq_len` with `args.method` and fine-tune `args.loop.steps` steps (0: only
    re-configure), writing the checkpoint to `args.loop.out`."""
    args.validate()
    source = load_config(args.ckpt)
    factor = args.factor if args.factor is not None else default_factor(source, args.seq_len)
    config = extended_config(source, args.method, factor, args.seq_len, args.rope_params)
    if args.s2_attn and (config.position == "alibi" or not config.causal):
        raise ConfigError("--s2-attn is for causal models without ALiBi; drop --s2-attn")
    tokenizer = load_tokenizer(args.ckpt)
    model = reconfigure(load_model(args.ckpt), config)
    steps = args.loop.steps
    config.extra["extension"].update(steps=steps, lora=args.lora, s2_attn=args.s2_attn, source=str(args.ckpt))
    out = Path(args.loop.out)
    if steps == 0:
        save_checkpoint(out, model, tokenizer)
        return ExtendResult(model=model, out_dir=out, config=config, history=[], final_val_loss=None)

    from longctx.train.pretrain import TrainArgs, train

    export = None
    if args.lora:
        apply_peft(model, longlora(args.lora_r, args.lora_alpha))
        export = merged_copy
    attention = None
    if args.s2_attn:
        from longctx.extend.s2attn import DEFAULT_GROUP_RATIO, group_size, s2_backend

        group_size(args.seq_len, DEFAULT_GROUP_RATIO)  # fail before training if the length cannot be grouped
        attention = s2_backend()
    lr = args.optim.lr if args.optim.lr is not None else DEFAULT_LR["lora" if args.lora else "full"]
    train_args = TrainArgs(
        data=args.data,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        optim=dataclasses.replace(args.optim, lr=lr),
        loop=args.loop,
    )
    result = train(train_args, model=model, tokenizer=tokenizer, export_model=export, attention=attention)
    if args.keep_adapter:
        save_lora_adapter(model, out / "adapter", base_model=str(args.ckpt))
        _export_hf_adapter(model, out)
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


def default_factor(config: GPTConfig, seq_len: int) -> float:
    """seq_len / the trained length (the original one, for an already extended model); at least 1."""
    L = (config.rope_scaling or {}).get("original_max_position_embeddings", config.max_seq_len)
    return max(1.0, seq_len / L)


def _export_hf_adapter(model: GPT, out: Path) -> None:
    """Also give the adapter to Hugging Face users: `OUT/hf-base` (the un-merged base weights with the new
    positions, a transformers directory) and `OUT/hf-adapter` (PEFT format with HF module names), so that
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT/hf-base), OUT/hf-adapter)` works.
    Skipped with a note when the model cannot be exported (e.g. ALiBi, LayerNorm: not Llama-shaped)."""
    from longctx.checkpoint import export_to_hf
    from longctx.interop.hf import hf_module_path

    try:
        export_to_hf(model, out / "hf-base", tokenizer_dir=out, lora="base")
    except LongctxError as e:
        print(f"note: no Hugging Face adapter export ({e})")
        return
    save_lora_adapter(model, out / "hf-adapter", base_model=str(out / "hf-base"), name_map=hf_module_path)
