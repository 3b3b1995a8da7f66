"""Does more context help my task? Fine-tune a classifier on long documents at several `--max-len` and
watch the score move with the context length.

The task is generated locally (`longctx.data.synthetic_tasks.key_classification`): each document states
its class once ("Account class: GOLD.") somewhere in lower-case filler and asks about it at the end. With
`--truncate tail` a model sees only the last `max_len` tokens, so the share of documents whose key survives
— and with it the best possible accuracy, 0.5 + 0.5 x share for two classes — grows with max_len.

    python examples/long_classification.py     # a fresh tiny model, a few minutes on 2 CPU cores
    python examples/long_classification.py --ckpt runs/base --peft lora --lengths 256,1024,4096 --chars 4096

The same through the CLI, once the data files exist:

    longctx finetune CKPT --task classify --data train.jsonl --eval eval.jsonl --out runs/sweep \\
        --truncate tail --sweep-len 32,64,128,256
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from longctx.checkpoint import save_checkpoint
from longctx.config import GPTConfig
from longctx.data.synthetic_tasks import key_classification, write_jsonl
from longctx.model import GPT
from longctx.tasks import FinetuneArgs, PeftSpec, sweep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="base checkpoint (default: a fresh tiny model, trained from scratch)")
    p.add_argument("--out", default="runs/long_classification")
    p.add_argument("--chars", type=int, default=256, help="document length in characters (byte tokens)")
    p.add_argument(
        "--depth",
        type=float,
        default=None,
        help="where the key sits, 0 (start) .. 1 (end); default: uniform at random",
    )
    p.add_argument("--lengths", default="32,64,128,256", help="max lengths to sweep")
    p.add_argument("--truncate", default="tail", choices=("head", "tail", "middle"))
    p.add_argument("--peft", default="none", choices=("lora", "adapter", "prefix", "none"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-docs", type=int, default=512)
    p.add_argument("--eval-docs", type=int, default=200)
    p.add_argument("--device", default="auto")
    a = p.parse_args()

    out = Path(a.out)
    ckpt = a.ckpt
    if ckpt is None:
        torch.manual_seed(0)
        config = GPTConfig.from_preset("tiny", n_layer=2, d_model=64, n_head=4, d_ff=192, max_seq_len=512)
        ckpt = str(save_checkpoint(out / "base", GPT(config)))
        print(
            f"no --ckpt: a fresh {GPT(config).num_parameters() / 1e6:.2f}M-parameter model at {ckpt} "
            "(the task is learned from scratch; use --peft none)"
        )
    train = write_jsonl(key_classification(a.train_docs, a.chars, seed=0, depth=a.depth), out / "train.jsonl")
    evals = write_jsonl(key_classification(a.eval_docs, a.chars, seed=1, depth=a.depth), out / "eval.jsonl")
    args = FinetuneArgs.from_flat(
        ckpt=ckpt,
        task="classify",
        data=str(train),
        eval=str(evals),
        out=str(out / "sweep"),
        peft=PeftSpec(a.peft),
        truncate=a.truncate,
        steps=a.steps,
        lr=a.lr,
        batch_size=a.batch_size,
        device=a.device,
        quiet=True,
    )
    summary = sweep(args, [int(x) for x in a.lengths.split(",")])
    kept = "" if a.depth is not None else " x the share of the document kept (max_len / chars)"
    print(
        f"\naccuracy vs context length ({a.chars}-character documents, key at "
        f"{'a random depth' if a.depth is None else f'depth {a.depth}'}, truncate {a.truncate}, peft {a.peft}; "
        f"best possible with two classes: 0.5 + 0.5{kept})"
    )
    print(summary["table"])
    print(f"\nresults: {out / 'sweep' / 'results.json'}   plot: {out / 'sweep' / 'sweep.png'}")


if __name__ == "__main__":
    main()
