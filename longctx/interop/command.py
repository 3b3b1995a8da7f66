"""`longctx convert {from-hf,to-hf} SRC DST`: move checkpoints between longctx and Hugging Face layouts.

    longctx convert from-hf ./Llama-3.2-1B ./runs/llama1b          # HF dir -> longctx checkpoint
    longctx convert to-hf ./runs/llama1b-yarn ./llama1b-yarn-hf     # longctx checkpoint -> HF dir
    longctx convert to-hf ./runs/tiny ./tiny-hf --dtype bfloat16 --architecture llama

Every other command also reads an HF directory directly; `from-hf` is for keeping a converted copy.
"""

from __future__ import annotations

import argparse

import torch

from longctx.interop.hf import ARCHITECTURE_OF

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    f = sub.add_parser("from-hf", help="Hugging Face directory -> longctx checkpoint")
    f.add_argument("src", help="Hugging Face model directory (config.json + safetensors), local only")
    f.add_argument("dst", help="longctx checkpoint directory to write")
    t = sub.add_parser("to-hf", help="longctx checkpoint -> Hugging Face directory (transformers, vLLM)")
    t.add_argument("src", help="longctx checkpoint directory (or an HF one)")
    t.add_argument("dst", help="Hugging Face directory to write")
    t.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="dtype of the saved weights (default: the source's recorded dtype, else float32)",
    )
    t.add_argument(
        "--architecture",
        choices=list(ARCHITECTURE_OF),
        default=None,
        help="HF family to write (default: the one it came from; else llama, or qwen2 for q/k/v biases)",
    )
    t.add_argument(
        "--keep-sliding-window",
        action="store_true",
        help="keep a Mistral/Qwen2 sliding_window smaller than the context (default: drop it, "
        "since longctx computes full attention)",
    )


def run(args: argparse.Namespace) -> int:
    from longctx.checkpoint import export_to_hf, import_from_hf

    if args.direction == "from-hf":
        out = import_from_hf(args.src, args.dst)
        print(f"wrote longctx checkpoint {out}")
    else:
        out = export_to_hf(
            args.src,
            args.dst,
            dtype=DTYPES.get(args.dtype),
            architecture=args.architecture,
            keep_sliding_window=args.keep_sliding_window,
        )
        print(f"wrote Hugging Face model {out} (load with AutoModelForCausalLM.from_pretrained)")
    return 0
