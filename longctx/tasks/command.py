"""`longctx finetune CKPT --task {classify,generate} --data train.jsonl [--eval eval.jsonl] --out DIR`

    longctx finetune runs/base --task classify --data train.jsonl --eval eval.jsonl --out runs/cls \\
        --peft lora --max-len 1024 --truncate middle
    longctx finetune runs/base --task classify --data train.jsonl --eval eval.jsonl --out runs/sweep \\
        --peft adapter --truncate tail --sweep-len 256,1024,4096     # does more context help my task?
    longctx finetune runs/base --task generate --data qa.jsonl --eval qa_eval.jsonl --out runs/qa --peft prefix
"""

from __future__ import annotations

import argparse
import json

from longctx.errors import ConfigError
from longctx.peft import ADAPTER_KINDS, PEFT_METHODS, PeftSpec
from longctx.tasks.data import TRUNCATIONS
from longctx.tasks.finetune import DEFAULT_LR, TASKS, FinetuneArgs, finetune, sweep
from longctx.train.options import add_options, values_from


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("ckpt", help="base checkpoint directory (longctx or Hugging Face)")
    p.add_argument(
        "--task",
        required=True,
        choices=TASKS,
        help="classify: `text` -> `label` (str or int); generate: `prompt` -> `completion`",
    )
    p.add_argument("--data", required=True, help="training records, JSONL")
    p.add_argument("--eval", help="evaluation records, JSONL (default: score on the training file)")
    p.add_argument("--out", required=True, help="output directory (adapter, head, merged model, results)")
    g = p.add_argument_group("inputs")
    g.add_argument("--max-len", type=int, help="tokens kept per input (default: the model's context length)")
    g.add_argument(
        "--truncate",
        default="middle",
        choices=TRUNCATIONS,
        help="which part of a longer input is kept: head (the start), tail (the end), middle "
        "(start and end, the middle is cut: LongBench's rule). Default middle",
    )
    g.add_argument(
        "--sweep-len",
        metavar="L1,L2,...",
        help="fine-tune and evaluate afresh at each max length (e.g. 256,1024,4096): a table, "
        "results.json and sweep.png of the score against context length",
    )
    g = p.add_argument_group("parameter-efficient fine-tuning")
    g.add_argument(
        "--peft",
        default="lora",
        choices=PEFT_METHODS,
        help="lora (mergeable), adapter (bottleneck), prefix (learned K/V per layer) or none "
        "(full fine-tuning). Default lora",
    )
    g.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (scale = alpha/r)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch")
    g.add_argument(
        "--adapter-kind",
        default="houlsby",
        choices=ADAPTER_KINDS,
        help="houlsby: adapters after attention and MLP; pfeiffer: after the MLP only",
    )
    g.add_argument("--adapter-size", type=int, default=16, help="adapter bottleneck width")
    g.add_argument("--prefix-len", type=int, default=16, help="learned key/value prefix length per layer")
    g = p.add_argument_group("training (the same loop and optimizer options as `longctx train`)")
    add_options(g, FinetuneArgs, HELP, skip=_OWN)
    g.add_argument(
        "--max-new-tokens", type=int, default=32, help="generate: tokens generated per eval prompt"
    )


# options declared above by hand (positional, required, or PEFT's own group)
_OWN = ("ckpt", "task", "data", "eval", "out", "peft", "max_len", "truncate", "max_new_tokens")
HELP = {
    "steps": "optimizer steps (default 100)",
    "lr": "peak learning rate, warmup + cosine (default per --peft: "
    + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
    + ")",
    "warmup": "linear warmup steps (default 10)",
    "weight_decay": "AdamW weight decay on matrices (default 0)",
    "batch_size": "examples per step (default 8)",
    "eval_batch_size": "examples per evaluation batch (default 16)",
    "seed": "seed for the new weights and the batch order",
    "out": "output directory (adapter, head, merged model, results)",
}


def parse_lengths(spec: str) -> list[int]:
    try:
        lengths = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--sweep-len expects comma-separated integers, e.g. 256,1024,4096; got {spec!r}"
        ) from None
    if not lengths or any(n <= 0 for n in lengths):
        raise ConfigError(f"--sweep-len lengths must be positive integers, got {spec!r}")
    return sorted(set(lengths))


def args_from_namespace(ns: argparse.Namespace) -> FinetuneArgs:
    spec = PeftSpec(
        method=ns.peft,
        lora_r=ns.lora_r,
        lora_alpha=ns.lora_alpha,
        lora_dropout=ns.lora_dropout,
        adapter_kind=ns.adapter_kind,
        adapter_size=ns.adapter_size,
        prefix_len=ns.prefix_len,
    )
    values = values_from(ns, FinetuneArgs)
    values.update(
        ckpt=ns.ckpt, task=ns.task, data=ns.data, eval=ns.eval, out=ns.out, peft=spec,
        max_len=ns.max_len, truncate=ns.truncate, max_new_tokens=ns.max_new_tokens,
    )  # fmt: skip
    return FinetuneArgs.from_flat(**values)


def run(ns: argparse.Namespace) -> int:
    args = args_from_namespace(ns)
    if ns.sweep_len:
        summary = sweep(args, parse_lengths(ns.sweep_len))
        print(
            f"\nscore vs context length ({args.task}, peft={args.peft.method}, truncate={args.truncate}; "
            f"model trained to {summary['trained_context']} tokens):"
        )
        print(summary["table"])
        print(f"results: {args.loop.out}/results.json  plot: {args.loop.out}/sweep.png")
        return 0
    result = finetune(args)
    shown = {k: v for k, v in result.metrics.items() if k != "samples"}
    print(json.dumps(shown, indent=2))
    if not args.peft.mergeable:
        print(
            f"note: --peft {args.peft.method} cannot be merged into the base weights; "
            f"the adapter is in {result.out_dir}/adapter.safetensors (load with longctx.tasks.load_finetuned)"
        )
    print(f"saved: {result.out_dir}")
    return 0
