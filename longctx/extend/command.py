"""`longctx extend CKPT --method M --factor S --seq-len N --steps K --out DIR`."""

from __future__ import annotations

import argparse
import json

from longctx.errors import ConfigError
from longctx.extend.recipe import METHODS


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
    p.add_argument("ckpt", help="checkpoint directory (longctx or Hugging Face)")
    p.add_argument(
        "--method",
        required=True,
        choices=METHODS,
        help="position scaling: none (train longer, positions as they are), linear (position "
        "interpolation; also the learned-table interpolation), ntk, dynamic (dynamic NTK), "
        "yarn, dynamic_yarn, longrope, llama3",
    )
    p.add_argument(
        "--factor",
        type=float,
        default=None,
        help="extension ratio s (default: --seq-len / the checkpoint's trained length)",
    )
    p.add_argument("--seq-len", type=int, required=True, help="the new context length (training length)")
    p.add_argument(
        "--steps", type=int, default=200, help="fine-tuning steps at --seq-len; 0: only re-configure"
    )
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument(
        "--rope-json",
        default=None,
        help="extra or overriding rope_scaling keys as JSON, e.g. '{\"beta_fast\": 16}' or a "
        'longrope \'{"short_factor": [...], "long_factor": [...]}\'',
    )
    p.add_argument(
        "--lora",
        action="store_true",
        help="LoRA on q/k/v/o plus trainable embeddings and norms (LongLoRA), merged at the end",
    )
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default 16)")
    p.add_argument(
        "--keep-adapter",
        action="store_true",
        help="with --lora: also save the adapter in PEFT's format in OUT/adapter/",
    )
    p.add_argument(
        "--s2-attn",
        action="store_true",
        help="LongLoRA's shifted sparse attention while training (groups of 1/4 of the length, "
        "half the heads shifted by half a group); full attention at inference",
    )
    p.add_argument(
        "--data", default=None, help="training data as in `longctx train` (default: embedded corpus)"
    )
    p.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default 2e-4, 1e-3 with --lora)"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--eval-every", type=int, default=0, help="validation every N steps (0: at the end)")
    p.add_argument("--checkpointing", default="none", help="activation checkpointing: none | all | every:K")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--quiet", action="store_true")


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


def run(args: argparse.Namespace) -> int:
    from longctx.checkpoint import load_config
    from longctx.extend.recipe import extend

    factor = args.factor
    if factor is None:
        config = load_config(args.ckpt)
        L = (config.rope_scaling or {}).get("original_max_position_embeddings", config.max_seq_len)
        factor = max(1.0, args.seq_len / L)
    result = extend(
        args.ckpt,
        args.method,
        factor,
        args.seq_len,
        args.steps,
        args.out,
        lora=args.lora,
        keep_adapter=args.keep_adapter,
        s2_attn=args.s2_attn,
        data=args.data,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        rope_params=_rope_params(args.rope_json),
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        grad_accum=args.grad_accum,
        warmup=args.warmup,
        save_every=args.save_every,
        eval_every=args.eval_every,
        checkpointing=args.checkpointing,
        precision=args.precision,
        resume=args.resume,
        quiet=args.quiet,
    )
    scaling = result.config.rope_scaling
    print(
        f"wrote {result.out_dir}: position={result.config.position} "
        f"rope_scaling={json.dumps(scaling) if scaling else None} max_seq_len={result.config.max_seq_len}"
        + (f" val_loss={result.final_val_loss:.4f}" if result.final_val_loss is not None else "")
    )
    return 0
