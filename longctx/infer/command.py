"""`longctx generate CKPT --prompt P`: continue a prompt and print the text as it is generated.

longctx generate runs/tiny --prompt "Once upon a time" --max-tokens 64
longctx generate smollm2-135m-instruct --chat --prompt "What is the capital of France?"   # a chat model
longctx generate runs/tiny --prompt "The" --temperature 0.8 --top-p 0.9 --seed 0 --stop "\\n\\n"
longctx generate runs/tiny --prompt "The" --max-tokens 5000 --stream-sinks 4 --window 252   # StreamingLLM

The engine options (weights dtype, KV cache, streaming, prefill chunk) are the same on `generate`, `serve`
and `eval` (`add_engine_arguments`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from longctx.errors import ConfigError


def add_engine_arguments(p: argparse.ArgumentParser, *, device_default: str = "cpu") -> None:
    """The EngineSpec options, shared by `generate`, `serve` and `eval`."""
    from longctx.infer.cache import KV_DTYPES
    from longctx.infer.engine import WEIGHT_DTYPES
    from longctx.infer.quant import FORMATS

    g = p.add_argument_group("engine (the same on generate, serve and eval)")
    g.add_argument(
        "--dtype",
        default="fp32",
        choices=["auto", *WEIGHT_DTYPES, "float32", "bfloat16", "float16"],
        help="weights dtype (default fp32; auto = bf16 where the CPU/GPU runs it natively, else fp32; "
        "losses and log-probabilities stay fp32)",
    )
    g.add_argument(
        "--quantize",
        default=None,
        choices=list(FORMATS),
        help="weight-only quantization at load, ggml's blocks of 32: int8 (Q8_0), int4 (Q4_0; a GGUF's "
        "Q4_0/Q4_1/Q8_0 blocks are used as they are); activations fp32, --dtype then the prefill's arithmetic "
        "(bf16: GEMMs and attention on bf16 copies where the CPU runs bf16 natively). Perplexity cost: docs/infer.md",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", *KV_DTYPES],
        help="what the KV cache stores: auto (the model's dtype, exact; bf16 with --quantize: half the bytes, "
        "perplexity cost at noise level), fp16 / bf16 (half of fp32; decode reads them without an fp32 copy on "
        "CPU), int8 (a quarter, per-head scales)",
    )
    # the flag this option replaced
    g.add_argument(
        "--kv-int8", action="store_const", const="int8", dest="kv_cache_dtype", help=argparse.SUPPRESS
    )
    g.add_argument(
        "--stream-sinks",
        type=int,
        default=None,
        metavar="N",
        help="StreamingLLM: keep the first N tokens (attention sinks, usually 4) plus a rolling "
        "window, so generation can run past the trained context at constant memory",
    )
    g.add_argument(
        "--window",
        type=int,
        default=None,
        help="StreamingLLM window (default: the trained context minus the sinks); implies "
        "--stream-sinks 4 when that is not given",
    )
    g.add_argument(
        "--exact-dynamic",
        action="store_true",
        help="dynamic NTK/YaRN, LongRoPE: rebuild the cache when the RoPE frequencies change, so decoding "
        "equals a full recompute (slow for dynamic types: a rebuild per token past the original length)",
    )
    g.add_argument(
        "--context-method",
        default=None,
        metavar="METHOD",
        help="a training-free context method for this run (self-extend, rerope, leaky-rerope, dual-chunk), "
        "on top of the checkpoint's own; see docs/extend.md",
    )
    add_method_parameters(g)
    g.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward")
    g.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    g.add_argument(
        "--prompt-cache-mb",
        type=int,
        default=2048,
        metavar="MB",
        help="memory for recent prompts' KV states: a prompt sharing a prefix with one of them prefills "
        "only the rest, with the same results (default 2048; 0 = off; generate runs one prompt, keeps none)",
    )
    g.add_argument(
        "--device", default=device_default, help=f"cpu, cuda, cuda:N or auto (default {device_default})"
    )


def add_method_parameters(g) -> None:
    """The context methods' parameters (defaults: `longctx.attention.context_methods.method_spec`)."""
    g.add_argument(
        "--group-size", type=int, default=None, help="Self-Extend: positions beyond the window // G"
    )
    g.add_argument(
        "--neighbor-window", type=int, default=None, help="Self-Extend / ReRoPE: exact positions within W"
    )
    g.add_argument(
        "--leak", type=float, default=None, help="leaky ReRoPE: distances beyond the window / LEAK"
    )
    g.add_argument("--dca-chunk-size", type=int, default=None, help="Dual Chunk: chunk size (default 3/4 L)")
    g.add_argument(
        "--dca-local-window", type=int, default=None, help="Dual Chunk: local window (default L/16)"
    )
    g.add_argument(
        "--context-factor", type=float, default=None, help="the length to reach, x the trained one"
    )


def method_parameters(args: argparse.Namespace) -> dict:
    return {
        "group_size": args.group_size,
        "window": args.neighbor_window,
        "leak": args.leak,
        "chunk_size": args.dca_chunk_size,
        "local_window": args.dca_local_window,
    }


def engine_spec(args: argparse.Namespace):
    from longctx.infer.engine import EngineSpec

    return EngineSpec(
        dtype=args.dtype,
        quantize=args.quantize,
        kv_dtype=args.kv_cache_dtype,
        sinks=args.stream_sinks,
        window=args.window,
        prefill_chunk=args.prefill_chunk,
        max_batch=args.max_batch,
        exact_dynamic=args.exact_dynamic,
        prompt_cache_mb=args.prompt_cache_mb,
        context_method=(
            None
            if args.context_method is None
            else {"name": args.context_method, "factor": args.context_factor, **method_parameters(args)}
        ),
    )


def configure(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n", 1)[1]
    p.add_argument("ckpt", help="checkpoint (a longctx or Hugging Face directory)")
    p.add_argument("--prompt", required=True, help="text to continue ('-' reads it from stdin)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is a user's message: render it with the model's chat template (as the server's "
        "/v1/chat/completions does) and stop at the end of the assistant's turn",
    )
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
    add_engine_arguments(p)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from longctx.infer.engine import load_engine
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
    spec = dataclasses.replace(engine_spec(args), prompt_cache_mb=0)  # one prompt: nothing to reuse
    engine = load_engine(args.ckpt, spec, args.device)
    if args.chat:
        from longctx.infer.chat import template_for

        template = template_for(engine.config.extra, engine.tokenizer)
        prompt = template.render([{"role": "user", "content": prompt}])
        params = dataclasses.replace(params, stop=[*params.stop, *template.default_stop])
    ids = engine.encode(prompt)
    context = engine.config.context_length
    if not engine.streaming and len(ids) + params.max_tokens > context:
        raise ConfigError(
            f"prompt ({len(ids)} tokens) + --max-tokens ({params.max_tokens}) exceed the model's "
            f"context of {context} tokens; lower --max-tokens, shorten the prompt, or use "
            "--stream-sinks 4 to run past it"
        )

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    # a bar on stderr while a prompt of several chunks is read (tqdm hides it when stderr is no terminal)
    with tqdm(total=len(ids), desc="prompt", unit="tok", disable=None, leave=False) as bar:

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        done = engine.generate(ids, params, on_delta=show, on_prefill=advance)
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(timing_line(done), file=sys.stderr)
    return 0


def timing_line(done) -> str:
    """What a run cost, as llama.cpp's timings say it: prompt and generated tokens, seconds, tokens/s."""

    def tokens(n: int) -> str:
        return f"{n} token{'' if n == 1 else 's'}"

    computed = done.prompt_tokens - done.cached_tokens
    prompt = f"prompt {tokens(done.prompt_tokens)} in {done.prefill_seconds:.2f} s"
    if done.prefill_seconds > 0 and computed:
        prompt += f" ({computed / done.prefill_seconds:.1f} tok/s)"
    if done.cached_tokens:
        prompt += f", {done.cached_tokens} from the prompt cache"
    new = len(done.token_ids)
    rate = f" ({new / done.decode_seconds:.1f} tok/s)" if done.decode_seconds > 0 and new else ""
    return f"{prompt}; {tokens(new)} generated in {done.decode_seconds:.2f} s{rate}"
