"""What each training-free context method costs against plain attention, in the same run (CPU).

    python bench/context_methods_speed.py                          # attention of one layer at 16K and 32K
    python bench/context_methods_speed.py --model --lengths 8192   # the real model's whole prefill
    python bench/context_methods_speed.py --model --decode 16      # and its decode steps after it

`--attention` (default) times what the methods change: one layer's causal attention over the whole sequence
with SmolLM2-135M's shapes (9 query heads, 3 key/value heads, head dim 64), q and k un-rotated as the
methods take them, against the model's own path (RoPE applied, then the CPU FlashAttention kernel). The
projections and the MLP are the same for every method, so the whole prefill costs less extra than this
ratio says; `--model` measures that too (the pulled model, prefill in chunks into the KV cache, as `eval`
and `generate` run it); `--decode N` then times N steps of one token as generation runs them (`forward_last`:
plain attention takes the fused native step, a method its region passes). Methods at factor 4 of a trained length of 8192 (the methods' own defaults:
Self-Extend group 5 / window 2048, ReRoPE window 2048, leaky ReRoPE, Dual Chunk chunk 6144).
"""

from __future__ import annotations

import argparse
import time

import torch

METHODS = ("self-extend", "rerope", "leaky-rerope", "dual-chunk")
TRAINED = 8192


def attention_seconds(method: str | None, length: int, reps: int) -> float:
    from longctx.attention import attention
    from longctx.attention.context_methods import ContextAttention, method_spec
    from longctx.config import GPTConfig
    from longctx.positions import build_positions
    from longctx.positions.rope import apply_rotary

    config = GPTConfig(n_layer=1, d_model=576, n_head=9, n_kv_head=3, head_dim=64, max_seq_len=TRAINED,
                       rope_theta=1e5)  # fmt: skip
    positions = build_positions(config)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, length, 64, generator=g)
    k, v = torch.randn(1, 3, length, 64, generator=g), torch.randn(1, 3, length, 64, generator=g)
    pos = torch.arange(length)[None]
    if method is None:

        def run():
            cos, sin = positions.rotary(pos)
            return attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, causal=True)
    else:
        fn = ContextAttention(method_spec(method, TRAINED, 4.0), positions.rotary, TRAINED)

        def run():
            return fn(q, k, v, q_offset=0, q_pos=pos, k_pos=pos)

    with torch.inference_mode():
        run()  # warm-up (kernels built, buffers touched)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
    return best


def model_seconds(method: str | None, length: int, decode: int = 0) -> tuple[float, float]:
    """-> (prefill seconds, seconds per decode step after it; 0 without `decode`)."""
    from longctx.infer.engine import EngineSpec, load_engine
    from longctx.infer.generate import forward_last, prefill

    spec = EngineSpec(
        prefill_chunk=1024, context_method=None if method is None else {"name": method, "factor": 4.0}
    )
    engine = load_engine("smollm2-135m-instruct", spec, "cpu", quiet=True)
    ids = torch.randint(0, engine.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    cache = engine.cache_for(1, length + decode)
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = prefill(engine.model, cache, ids, 1024)
        t1 = time.perf_counter()
        for _ in range(decode):
            logits = forward_last(engine.model, cache, logits.argmax(-1, keepdim=True))
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / max(decode, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="store_true", help="the whole prefill of the pulled SmolLM2")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument(
        "--decode", type=int, default=0, help="--model: time this many decode steps after the prefill"
    )
    p.add_argument("--reps", type=int, default=2, help="attention timings: best of this many")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from longctx.device import cpu_name

    lengths = args.lengths or ([8192, 16384] if args.model else [16384, 32768])
    what = "whole prefill of SmolLM2-135M" if args.model else "one layer's attention (SmolLM2 shapes)"
    decode = args.decode if args.model else 0
    then = f"; then ms per decode step (mean of {decode})" if decode else ""
    print(f"{cpu_name()}, {args.threads} threads: {what}, seconds (ratio to plain){then}")
    cols = [f"{L}" for L in lengths] + ([f"{L} decode ms" for L in lengths] if decode else [])
    print(f"{'method':<14}" + "".join(f"{c:>18}" for c in cols))

    def timer(m: str | None, L: int) -> tuple[float, float]:
        return model_seconds(m, L, decode) if args.model else (attention_seconds(m, L, args.reps), 0.0)

    def row(name: str, got: dict[int, tuple[float, float]], base: dict[int, tuple[float, float]]) -> str:
        cells = [f"{got[L][0]:>11.2f} ({got[L][0] / base[L][0]:.2f})" for L in lengths]
        if decode:
            cells += [f"{got[L][1] * 1e3:>11.1f} ({got[L][1] / base[L][1]:.2f})" for L in lengths]
        return f"{name:<14}" + "".join(cells)

    plain = {L: timer(None, L) for L in lengths}
    print(row("plain", plain, plain), flush=True)
    for m in args.methods:
        print(row(m, {L: timer(m, L) for L in lengths}, plain), flush=True)
    print("target: the two-pass methods (self-extend, rerope, leaky-rerope) within 2.2x of plain")


if __name__ == "__main__":
    main()
