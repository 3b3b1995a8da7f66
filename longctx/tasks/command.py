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
from longctx.tasks.data import TRUNCATIONS
from longctx.tasks.finetune import TASKS, FinetuneArgs, finetune, sweep
from longctx.tasks.peft_methods import ADAPTER_KINDS, PEFT_METHODS, PeftSpec


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
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=100, help="optimizer steps")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warmup + cosine)")
    g.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices")
    g.add_argument("--batch-size", type=int, default=8, help="examples per step")
    g.add_argument("--seed", type=int, default=0, help="seed for the new weights and the batch order")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument(
        "--max-new-tokens", type=int, default=32, help="generate: tokens generated per eval prompt"
    )
    g.add_argument("--quiet", action="store_true", help="no progress output")


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
    return FinetuneArgs(
        ckpt=ns.ckpt,
        task=ns.task,
        data=ns.data,
        eval=ns.eval,
        out=ns.out,
        peft=spec,
        max_len=ns.max_len,
        truncate=ns.truncate,
        steps=ns.steps,
        lr=ns.lr,
        warmup=ns.warmup,
        weight_decay=ns.weight_decay,
        batch_size=ns.batch_size,
        seed=ns.seed,
        device=ns.device,
        max_new_tokens=ns.max_new_tokens,
        quiet=ns.quiet,
    )


def run(ns: argparse.Namespace) -> int:
    args = args_from_namespace(ns)
    if ns.sweep_len:
        summary = sweep(args, parse_lengths(ns.sweep_len))
        print(
            f"\nscore vs context length ({args.task}, peft={args.peft.method}, truncate={args.truncate}; "
            f"model trained to {summary['trained_context']} tokens):"
        )
        print(summary["table"])
        print(f"results: {args.out}/results.json  plot: {args.out}/sweep.png")
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
