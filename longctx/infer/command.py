"""`longctx generate CKPT --prompt P`: continue a prompt and print the text as it is generated.

longctx generate runs/tiny --prompt "Once upon a time" --max-tokens 64
longctx generate runs/tiny --prompt "The" --temperature 0.8 --top-p 0.9 --seed 0 --stop "\\n\\n"
longctx generate runs/tiny --prompt "The" --max-tokens 5000 --stream-sinks 4 --window 252   # StreamingLLM
"""

from __future__ import annotations

import argparse
import sys

from longctx.errors import ConfigError


def configure(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n", 1)[1]
    p.add_argument("ckpt", help="checkpoint directory (longctx or Hugging Face)")
    p.add_argument("--prompt", required=True, help="text to continue ('-' reads it from stdin)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), >0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide seen tokens' positive logits by this, multiply negative ones (1 = off)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same text)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; not printed)")
    p.add_argument(
        "--stream-sinks",
        type=int,
        default=None,
        metavar="N",
        help="StreamingLLM: keep the first N tokens (attention sinks, usually 4) plus a rolling "
        "window, so generation can run past the trained context at constant memory",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="StreamingLLM window (default: the trained context minus the sinks); implies "
        "--stream-sinks 4 when that is not given",
    )
    add_kv_cache_argument(p)
    p.add_argument(
        "--exact-dynamic",
        action="store_true",
        help="dynamic NTK/YaRN, LongRoPE: rebuild the cache when the RoPE frequencies change, so decoding "
        "equals a full recompute (slow for dynamic types: a rebuild per token past the original length)",
    )
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def add_kv_cache_argument(p: argparse.ArgumentParser) -> None:
    """--kv-cache-dtype (vLLM's name for it), shared by `generate` and `serve`."""
    from longctx.infer.cache import KV_DTYPES

    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", *KV_DTYPES],
        help="what the KV cache stores: auto (the model's dtype, exact), fp16 / bf16 (half of fp32; decode "
        "reads them without an fp32 copy on CPU), int8 (a quarter, per-head scales)",
    )
    # the flag this option replaced
    p.add_argument(
        "--kv-int8", action="store_const", const="int8", dest="kv_cache_dtype", help=argparse.SUPPRESS
    )


def run(args: argparse.Namespace) -> int:
    from longctx.checkpoint import load_model
    from longctx.data.tokenizer import load_tokenizer
    from longctx.infer.engine import Engine
    from longctx.infer.sampling import SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
        seed=args.seed,
    )
    params.validate()
    if args.prefill_chunk < 1:
        raise ConfigError(f"--prefill-chunk must be at least 1, got {args.prefill_chunk}")
    model = load_model(args.ckpt, device=args.device)
    engine = Engine(
        model,
        load_tokenizer(args.ckpt),
        sinks=args.stream_sinks,
        window=args.window,
        kv_dtype=args.kv_cache_dtype,
        prefill_chunk=args.prefill_chunk,
        exact_dynamic=args.exact_dynamic,
    )
    ids = engine.encode(prompt)
    context = model.config.context_length
    if not engine.streaming and len(ids) + params.max_tokens > context:
        raise ConfigError(
            f"prompt ({len(ids)} tokens) + --max-tokens ({params.max_tokens}) exceed the model's "
            f"context of {context} tokens; lower --max-tokens, shorten the prompt, or use "
            "--stream-sinks 4 to run past it"
        )

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    engine.generate(ids, params, on_delta=show)
    sys.stdout.write("\n")
    return 0
