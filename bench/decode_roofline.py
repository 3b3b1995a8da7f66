"""How close a decode step comes to the memory-bandwidth roofline of each weight format, on this CPU.

    python bench/decode_roofline.py                       # SmolLM2-135M's shapes, contexts 1 and 4096
    python bench/decode_roofline.py --contexts 1 16384 --formats int4 --kv fp16

A decode step streams every weight and the whole KV cache once per token, so its floor is bytes read /
read bandwidth. This runs the engine's step (`forward_last`: the fused native layers, then the LM head) on a
model of the given shapes with random weights, in each weight format (fp32, bf16, int8 = Q8_0, int4 = Q4_0;
fp16 on request; the head Q8_0 for the quantized ones, as `--quantize` does), over a cache filled with
random keys and values at each context, and prints the step's time, the bytes it must read, and their ratio as a share of the read
bandwidth measured around that row (a 512 MiB fp32 sum, best of 7, just before and just after it; the
higher kept): on a shared host the bandwidth itself moves between rows (38.6-57.6 GB/s in three runs of
this script within ten minutes on a 2-core AMD EPYC Zen 5, where one reading for the whole run put the same
code's rows at 48-98% across five).
Context 1 is the weights alone; a long context adds the cache (2 x layers x kv heads x head dim values per
token). `--shapes` takes any checkpoint's config (the default is the pulled SmolLM2's, or its dimensions).
"""

from __future__ import annotations

import argparse
import time

import torch

SMOLLM2 = dict(
    n_layer=30, d_model=576, n_head=9, n_kv_head=3, d_ff=1536, vocab_size=49152, tie_embeddings=True
)  # fmt: skip
# bytes per cached value (int8: plus a 4-byte scale per row, below)
KV_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def read_bandwidth(nbytes: int = 512 * 2**20, reps: int = 7) -> float:
    """Bytes per second of a plain streaming read (torch's fp32 sum: ~the same as a hand-written loop)."""
    a = torch.randn(nbytes // 4)
    a.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def shapes_config(name: str | None):
    """The config of `name`, else the pulled SmolLM2's, else its dimensions (the weights are random anyway)."""
    from longctx.checkpoint import load_config
    from longctx.config import GPTConfig
    from longctx.errors import CheckpointError

    try:
        return load_config(name or "smollm2-135m-instruct")
    except CheckpointError:
        if name:
            raise
        return GPTConfig.from_preset("tiny", **SMOLLM2, max_seq_len=16384)


def build(config, fmt: str):
    """A model in weight format `fmt` and the bytes one decode step reads of it (every linear of the blocks,
    the norms, the LM head; not the embedding table, of which a step reads one row)."""
    from longctx.infer import quant
    from longctx.model import GPT

    torch.manual_seed(0)
    model = GPT(config).eval()
    if fmt in ("bf16", "fp16"):
        model = model.to(torch.bfloat16 if fmt == "bf16" else torch.float16)
    elif fmt in quant.FORMATS:
        quant.quantize_model(model, fmt)
    blocks = sum(
        (m.blocks.numel() if isinstance(m, quant.QuantizedLinear) else 0)
        + sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        for m in model.blocks.modules()
    )
    head = getattr(model, "quantized_head", None)
    head_bytes = head.blocks.numel() if head is not None else model.head_weight.nbytes
    return model, blocks + head_bytes


@torch.inference_mode()
def step_time(model, config, context: int, kv: str, steps: int) -> float:
    """Fastest of `steps` decode steps after `context` cached tokens (random keys and values)."""
    from longctx.infer.cache import make_cache
    from longctx.infer.generate import forward_last

    cache = make_cache(config, 1, context + steps + 1, kv_dtype=kv)
    if kv == "int8":  # Int8KVCache: int8 values with a scale per (head, token)
        cache.kq.random_(-127, 128), cache.vq.random_(-127, 128), cache.ks.fill_(0.01), cache.vs.fill_(0.01)
    else:
        cache.k.normal_(), cache.v.normal_()
    cache.length = context - 1  # the filled slots count as the prompt; the first step below is its last
    ids = torch.tensor([[1]])
    forward_last(model, cache, ids)  # builds the fused plan
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        forward_last(model, cache, ids)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=None, help="a checkpoint or catalogue name whose config to use")
    p.add_argument(
        "--formats",
        nargs="+",
        default=["fp32", "bf16", "int8", "int4"],
        choices=["fp32", "bf16", "fp16", "int8", "int4"],
    )
    p.add_argument("--contexts", type=int, nargs="+", default=[1, 4096])
    p.add_argument("--kv", default="fp16", choices=sorted(KV_BYTES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from longctx import kernels
    from longctx.device import cpu_name
    from longctx.infer import fused_decode
    from longctx.infer.cache import make_cache

    config = shapes_config(args.shapes)
    print(f"{cpu_name()}, {args.threads} threads; native kernels: {kernels.describe()}")
    print(f"shapes: {config.n_layer} layers, d {config.d_model}, {config.n_head} heads / {config.n_kv_head} kv "
          f"of {config.head_dim}, ff {config.d_ff}, vocab {config.vocab_size}; cache {args.kv}")  # fmt: skip
    rows = []
    for fmt in args.formats:
        model, weight_bytes = build(config, fmt)
        for ctx in args.contexts:
            before = read_bandwidth()
            t = step_time(model, config, ctx, args.kv, args.steps)
            bw = max(before, read_bandwidth())  # a neighbour may have slowed one reading
            row = config.head_dim * KV_BYTES[args.kv] + (4 if args.kv == "int8" else 0)
            kv_bytes = 2 * config.n_layer * config.n_kv_head * ctx * row
            rows.append((fmt, ctx, t, weight_bytes + kv_bytes, bw))
        with torch.inference_mode():
            fused = fused_decode.why_not(model, make_cache(config, 1, 8, kv_dtype=args.kv))
        fused = "every layer in one native call" if fused is None else f"the per-op path: {fused}"
        print(f"  {fmt}: {weight_bytes / 2**20:.0f} MiB of weights per step ({fused})", flush=True)
    print("read bandwidth: measured around each row (the higher of the readings just before and after it)")
    print(
        f"{'weights':<8}{'context':>9}{'step ms':>10}{'tok/s':>8}{'MB read':>9}{'GB/s':>7}{'bandwidth':>11}"
        f"{'of roofline':>13}"
    )
    for fmt, ctx, t, nbytes, bw in rows:
        print(f"{fmt:<8}{ctx:>9}{t * 1e3:>10.2f}{1 / t:>8.1f}{nbytes / 1e6:>9.0f}{nbytes / t / 1e9:>7.1f}"
              f"{bw / 1e9:>11.1f}{nbytes / t / bw:>12.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
