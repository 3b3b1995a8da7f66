"""`longctx convert {from-hf,to-hf,from-gguf,to-gguf} SRC DST`: move checkpoints between formats.

    longctx convert from-hf ./Llama-3.2-1B ./runs/llama1b          # HF dir -> longctx checkpoint
    longctx convert to-hf ./runs/llama1b-yarn ./llama1b-yarn-hf     # longctx checkpoint -> HF dir
    longctx convert to-hf ./runs/tiny ./tiny-hf --dtype bfloat16 --architecture llama
    longctx convert from-gguf ./model.Q4_K_M.gguf ./runs/model      # GGUF -> longctx checkpoint (fp32)
    longctx convert to-gguf ./runs/model-yarn ./model-yarn.gguf --outtype q8_0   # -> llama.cpp / ollama

Every other command also reads an HF directory or a .gguf file directly; `from-*` keeps a converted copy.
An extended model exported to GGUF carries its RoPE scaling (`rope.scaling.*`), so llama.cpp runs it at
the new length with no extra flags.
"""

from __future__ import annotations

import argparse

import torch

from longctx.interop.gguf import OUT_TYPES
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
    t.add_argument("src", help="checkpoint (longctx or HF directory, .gguf file)")
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
    g = sub.add_parser("from-gguf", help="GGUF file (llama.cpp) -> longctx checkpoint")
    g.add_argument("src", help="a .gguf file (F32/F16/BF16, Q8_0, Q4_0/1, Q5_0/1, K-quants)")
    g.add_argument("dst", help="longctx checkpoint directory to write")
    o = sub.add_parser("to-gguf", help="checkpoint -> GGUF file that llama.cpp and ollama run")
    o.add_argument("src", help="checkpoint (longctx or HF directory, .gguf file, pulled name)")
    o.add_argument("dst", help="the .gguf file to write")
    o.add_argument("--outtype", choices=list(OUT_TYPES), default="f32", help="weight type (default f32)")


def run(args: argparse.Namespace) -> int:
    from longctx import checkpoint

    if args.direction == "from-hf":
        out = checkpoint.import_from_hf(args.src, args.dst)
        print(f"wrote longctx checkpoint {out}")
    elif args.direction == "from-gguf":
        model, tokenizer = checkpoint.load_model(args.src), checkpoint.load_tokenizer(args.src)
        out = checkpoint.save_checkpoint(args.dst, model, tokenizer)
        print(f"wrote longctx checkpoint {out}")
    elif args.direction == "to-gguf":
        out = checkpoint.export_to_gguf(args.src, args.dst, outtype=args.outtype)
        print(f"wrote {out} ({args.outtype}; run it with llama.cpp: llama-cli -m {out})")
    else:
        out = checkpoint.export_to_hf(
            args.src,
            args.dst,
            dtype=DTYPES.get(args.dtype),
            architecture=args.architecture,
            keep_sliding_window=args.keep_sliding_window,
        )
        print(f"wrote Hugging Face model {out} (load with AutoModelForCausalLM.from_pretrained)")
    return 0
