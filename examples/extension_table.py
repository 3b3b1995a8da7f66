"""Context extension on the embedded corpus, measured the way YaRN's Table 1 is: perplexity vs context length.

1. train a RoPE model (`small` preset) at L0 = 256 on the embedded corpus (skipped if OUT/base exists);
2. for each method (none, linear, ntk, yarn) extend it to 2048 (s = 8) with 0 and with 100 fine-tuning steps;
3. print a table of validation perplexity at 256, 512, 1024, 2048 and 4096 tokens (disjoint windows over the
   same token budget at every length), and write OUT/results.json and OUT/table.md.

What the papers lead us to expect: `none` blows up past L0; with fine-tuning, `yarn` at 2048 is no worse than
at 256 and no worse than `linear`. This script reports what it measures, whichever way it comes out.

    python examples/extension_table.py                       # the full table (CPU: allow an hour or more)
    python examples/extension_table.py --preset tiny --steps 30 --ft-steps 3 --l0 64 --seq-len 256 \
        --factor 4 --lengths 64,128,256,512 --eval-tokens 2048 --out runs/ext-quick   # a quick check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from longctx.checkpoint import load_model, load_tokenizer
from longctx.data.cache import token_file
from longctx.device import resolve_device
from longctx.eval.ppl import perplexity
from longctx.extend import ExtendArgs, extend
from longctx.train.pretrain import TrainArgs, train


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--l0", type=int, default=256, help="pre-training length")
    p.add_argument(
        "--steps", type=int, default=1000, help="pre-training steps (about 10 min of CPU for small)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="pre-training batch")
    p.add_argument("--methods", default="none,linear,ntk,yarn")
    p.add_argument("--seq-len", type=int, default=2048, help="extension length")
    p.add_argument("--factor", type=float, default=8.0)
    p.add_argument("--ft-steps", type=int, default=100, help="fine-tuning steps (besides 0)")
    p.add_argument("--ft-batch-size", type=int, default=1)
    p.add_argument("--ft-lr", type=float, default=2e-4)
    p.add_argument("--lora", action="store_true", help="fine-tune with LoRA (+ embeddings and norms)")
    p.add_argument("--lengths", default="256,512,1024,2048,4096")
    p.add_argument("--eval-tokens", type=int, default=32768, help="validation tokens scored at each length")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/extension_table")
    return p.parse_args()


def pretrain(args: argparse.Namespace, out: Path) -> Path:
    base = out / "base"
    if (base / "model.safetensors").exists():
        print(f"reusing {base} (delete it to retrain)")
        return base
    train(
        TrainArgs.from_flat(
            preset=args.preset,
            config_overrides={"position": "rope", "max_seq_len": args.l0},
            seq_len=args.l0,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
            out=str(base),
        )
    )
    return base


def evaluate(ckpt: Path, tokens, lengths: list[int], eval_tokens: int, device: str) -> dict[int, float]:
    model = load_model(ckpt, device=resolve_device(device))
    return {
        n: perplexity(model, tokens, n, max_windows=max(1, eval_tokens // n), progress=False)["ppl"]
        for n in lengths
    }


def format_table(rows: list[dict], lengths: list[int]) -> str:
    head = "| method | FT steps | " + " | ".join(f"PPL@{n}" for n in lengths) + " |"
    lines = [head, "|" + "---|" * (len(lengths) + 2)]
    for r in rows:
        cells = [f"{r['ppl'][n]:.3f}" if r["ppl"][n] < 1e4 else f"{r['ppl'][n]:.2e}" for n in lengths]
        lines.append(f"| {r['method']} | {r['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    lengths = [int(x) for x in args.lengths.split(",")]
    t0 = time.perf_counter()
    base = pretrain(args, out)
    val = token_file(None, load_tokenizer(base), "val")
    rows = [
        {
            "method": "base (no extension)",
            "steps": 0,
            "ppl": evaluate(base, val, lengths, args.eval_tokens, args.device),
        }
    ]
    for method in args.methods.split(","):
        for steps in (0, args.ft_steps):
            ckpt = out / f"{method}-{steps}"
            extend(
                ExtendArgs.from_flat(
                    ckpt=str(base),
                    method=method,
                    factor=args.factor,
                    seq_len=args.seq_len,
                    steps=steps,
                    out=str(ckpt),
                    lora=args.lora,
                    lr=args.ft_lr,
                    batch_size=args.ft_batch_size,
                    seed=args.seed,
                    device=args.device,
                    quiet=True,
                )
            )
            rows.append(
                {
                    "method": method,
                    "steps": steps,
                    "ppl": evaluate(ckpt, val, lengths, args.eval_tokens, args.device),
                }
            )
            print(
                f"{method:>8} {steps:>4} steps: "
                + "  ".join(f"{n}:{p:.3f}" for n, p in rows[-1]["ppl"].items())
            )
    table = format_table(rows, lengths)
    print(
        f"\nvalidation perplexity, {args.preset} RoPE trained at L0={args.l0} for {args.steps} steps, extended "
        f"to {args.seq_len} (s={args.factor:g}); {args.eval_tokens} tokens per length; "
        f"{time.perf_counter() - t0:.0f}s\n"
    )
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
