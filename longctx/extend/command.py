"""`longctx extend CKPT --method M --factor S --seq-len N --steps K --out DIR`.

Every training option of `longctx train` that is not about the model or corpus applies here too (the loop
and optimizer specs are shared): --grad-accum, --checkpointing, --precision, --resume, --dp/--cp, ...
"""

from __future__ import annotations

import argparse
import json

from longctx.attention.context_methods import method_names
from longctx.errors import ConfigError
from longctx.extend.recipe import ExtendArgs, method_help, methods
from longctx.infer.command import add_method_parameters, method_parameters
from longctx.train.options import add_options, values_from

HELP = {
    "seq_len": "the new context length (the fine-tune's training length)",
    "factor": "extension ratio s (default: --seq-len / the checkpoint's trained length)",
    "steps": "fine-tuning steps at --seq-len; 0: only re-configure (default 200)",
    "out": "output checkpoint directory",
    "lr": "peak learning rate (default 2e-4, 1e-3 with --lora)",
    "lora": "LoRA on q/k/v/o plus trainable embeddings and norms (LongLoRA), merged at the end",
    "lora_r": "LoRA rank (default 8)",
    "lora_alpha": "LoRA alpha (default 16)",
    "keep_adapter": "with --lora: also save the adapter in PEFT's format in OUT/adapter/",
    "s2_attn": "LongLoRA's shifted sparse attention while training (groups of 1/4 of the length, "
    "half the heads shifted by half a group); full attention at inference",
    "data": "training data as in `longctx train` (default: embedded corpus)",
    "batch_size": "sequences per micro-batch (default 4)",
    "cache_dir": "where tokenized corpora are cached (default ~/.cache/longctx)",
}


def configure(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Extend a checkpoint's context window: re-configure its positions for --seq-len (RoPE "
        "scaling keyed as Hugging Face's rope_scaling), then fine-tune --steps steps at that "
        "length (0: no training). The new config carries the scaling, so eval, generate, serve "
        "and HF export use the same positions."
    )
    p.epilog = (
        "example: longctx extend runs/small --method yarn --factor 8 --seq-len 2048 --steps 200 "
        "--out runs/small-yarn8"
    )
    p.add_argument("ckpt", help="checkpoint (a longctx or Hugging Face directory)")
    p.add_argument("--method", required=True, choices=methods(), help="position scaling: " + method_help())
    p.add_argument("--seq-len", type=int, required=True, help=HELP["seq_len"])
    p.add_argument("--out", required=True, help=HELP["out"])
    p.add_argument(
        "--rope-json",
        default=None,
        help="extra or overriding rope_scaling keys as JSON, e.g. '{\"beta_fast\": 16}' or a "
        'longrope \'{"short_factor": [...], "long_factor": [...]}\'',
    )
    add_options(p, ExtendArgs, HELP, skip=("ckpt", "method", "seq_len", "out", "rope_params"))
    add_method_parameters(p.add_argument_group("training-free context methods (self-extend, rerope, ...)"))


def _rope_params(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--rope-json is not valid JSON ({e}); e.g. '{{\"beta_fast\": 16}}'") from None
    if not isinstance(value, dict):
        raise ConfigError("--rope-json must be a JSON object of rope_scaling keys")
    return value


def args_from_namespace(ns: argparse.Namespace) -> ExtendArgs:
    values = values_from(ns, ExtendArgs)
    values["rope_params"] = _rope_params(ns.rope_json)
    if ns.method in method_names():  # a context method's parameters ride where RoPE's keys would
        values["rope_params"] = {**values["rope_params"],
                                 **{k: v for k, v in method_parameters(ns).items() if v is not None}}  # fmt: skip
    return ExtendArgs.from_flat(**values)


def run(ns: argparse.Namespace) -> int:
    from longctx.extend.recipe import extend

    result = extend(args_from_namespace(ns))
    scaling = result.config.rope_scaling
    print(
        f"wrote {result.out_dir}: position={result.config.position} "
        f"rope_scaling={json.dumps(scaling) if scaling else None} max_seq_len={result.config.max_seq_len}"
        + (f" val_loss={result.final_val_loss:.4f}" if result.final_val_loss is not None else "")
    )
    return 0
