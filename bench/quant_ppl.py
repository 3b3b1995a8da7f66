"""What weight formats cost in perplexity, on held-out standard-library files, against fp32 (same run).

    python bench/quant_ppl.py                                    # the pulled SmolLM2, 2 windows of 4096
    python bench/quant_ppl.py --ckpt runs/base --length 2048 --windows 4

Rows: fp32 (the reference), bf16 weights, int8 (Q8_0 blocks quantized at load), int4 as `--quantize int4`
loads it (a GGUF's own Q4_0/Q4_1 blocks kept as they are: for the pulled SmolLM2, whose fp32 weights are its
Q4_1 file dequantized, that is no rounding at all), int4 requantized to Q4_0 from the fp32 weights (what
a model with no quantized file gets), and where the CPU runs bf16 natively int8 / int4 with the prefill on
bf16 arithmetic (what `--dtype auto` gives them there: longctx/infer/quant.py). The windows' perplexity is the prefill's arithmetic (many rows: the
weights dequantized, fp32 GEMMs); decode steps take another path, the matrix-vector kernels, which also
round the activations (to int16 per block of 32). So each row also scores `--decode-tokens` held-out
tokens one decode step at a time (teacher-forced, through the KV cache: the path `generate` and `serve`
take), runs 32 greedy tokens, and says whether they match fp32's.

With --int8-activations, one more row: int8 weights *and* activations in the prefill's GEMMs (fbgemm's
dynamic int8 linear through torch: each row of x rescaled to its own absmax first, so its scale is per row,
7-bit activations where AVX2 would saturate 8-bit ones, weights int8 per output channel); its decode
steps stay as int8 does them. It is what an int8-GEMM prefill (its speed against fp32 GEMMs is printed in
the same run) would cost in perplexity, the question before building one.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    from longctx.checkpoint import gguf_blocks, load_model, load_tokenizer
    from longctx.data.cache import token_file
    from longctx.device import cpu_emulates
    from longctx.eval.ppl import perplexity
    from longctx.infer import decode_ops
    from longctx.infer.engine import Engine, EngineSpec
    from longctx.infer.quant import quantize_model
    from longctx.infer.sampling import SamplingParams

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="smollm2-135m-instruct")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=512, help="tokens scored one decode step at a time")
    p.add_argument("--int8-activations", action="store_true", help="add the int8 weights + activations row")
    p.add_argument(
        "--rows", nargs="+", default=None, help="only these rows (fp32, the reference, always runs)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.ckpt)
    tokens = token_file(None, tok, "val")
    prompt = [int(t) for t in tokens[:512]]

    def build(row: str):
        model = load_model(args.ckpt).eval()
        if row == "bf16":
            model = model.to(torch.bfloat16)
        elif row == "int8":
            quantize_model(model, "int8")
        elif row == "int4":
            quantize_model(model, "int4", gguf_blocks(args.ckpt))
        elif row == "int4 (Q4_0 from fp32)":
            quantize_model(model, "int4")
        elif row == "int8 (bf16 prefill)":
            quantize_model(model, "int8", prefill_dtype=torch.bfloat16)
        elif row == "int4 (bf16 prefill)":
            quantize_model(model, "int4", gguf_blocks(args.ckpt), prefill_dtype=torch.bfloat16)
        elif row == W8A8:
            quantize_model(model, "int8")
            int8_activations(model)
        # as load_engine does: a bf16 model's windows on fp32 GEMMs where the CPU emulates bf16
        decode_ops.install(model)
        return model

    print(f"{args.ckpt}: {args.windows} held-out windows of {args.length} tokens")
    print(f"{'weights':<24}{'ppl':>9}{'vs fp32':>10}{'decode ppl':>12}{'vs fp32':>10}{'greedy 32 = fp32':>18}"
          f"{'seconds':>9}")  # fmt: skip
    ref_ppl = ref_decode = ref_tokens = None
    scored = torch.tensor([[int(t) for t in tokens[-args.decode_tokens - 1 :]]])  # the held-out tail
    rows = ["fp32", "bf16", "int8", "int4", "int4 (Q4_0 from fp32)"] + [W8A8] * args.int8_activations
    if not cpu_emulates(torch.bfloat16):  # quantized weights' bf16 prefill arithmetic (--dtype auto there)
        rows[4:4] = ["int8 (bf16 prefill)", "int4 (bf16 prefill)"]
    rows = [r for r in rows if args.rows is None or r == "fp32" or r.split()[0] in args.rows]
    for row in rows:
        t0 = time.perf_counter()
        model = build(row)
        with torch.inference_mode():
            ppl = perplexity(model, tokens, args.length, max_windows=args.windows, eos_id=tok.eos_id,
                             progress=False)["ppl"]  # fmt: skip
            dec = decode_perplexity(model, scored)
            out = Engine(model, None, EngineSpec(), stop_at_eos=False).generate(
                prompt, SamplingParams(max_tokens=32)
            )
        ref_ppl, ref_decode = ref_ppl or ppl, ref_decode or dec
        ref_tokens = ref_tokens or out.token_ids
        n = next((i for i, (a, b) in enumerate(zip(out.token_ids, ref_tokens)) if a != b), None)
        same = "all" if n is None else f"first {n}"
        print(
            f"{row:<24}{ppl:>9.4f}{ppl / ref_ppl - 1:>+9.2%}{dec:>12.4f}{dec / ref_decode - 1:>+9.2%}{same:>18}"
            f"{time.perf_counter() - t0:>9.0f}",
            flush=True,
        )
        del model
    print(
        f"(perplexity exp(mean NLL) over the windows; decode ppl: the last {args.decode_tokens} held-out tokens, "
        "one decode step each; greedy: 32 tokens after 512 held-out tokens)"
    )
    if args.int8_activations:
        print(
            f"{W8A8}: GEMM time at 1024 rows, fp32 / int8 on this CPU: {gemm_speedup(load_model(args.ckpt)):.2f}x"
        )


W8A8 = "int8 w+a (prefill)"


def _quantize_weight(weight: torch.Tensor):
    """fbgemm's packed int8 weight: symmetric, one scale per output channel."""
    import warnings

    warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")  # torch's deprecation notice
    scale = weight.abs().amax(1).clamp_min(1e-12).double() / 127
    q = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None)


def _w8a8(x: torch.Tensor, packed) -> torch.Tensor:
    """x W^T with x rounded to integers per row: x / absmax(row) leaves fbgemm's per-tensor scale one per
    row. reduce_range: 7-bit activations, as torch's own dynamic Linear module asks — without VNNI the u8 x
    s8 products are summed pairwise in int16 and 8-bit activations saturate (on random 40 x 96 x 64 data:
    5.8% relative error against 1.5% with 7 bits)."""
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    return torch.ops.quantized.linear_dynamic(x / s, packed, reduce_range=True) * s


def int8_activations(model) -> None:
    """Route each quantized layer's multi-row products (prefill, perplexity) through `_w8a8`."""
    from longctx.infer.quant import QuantizedLinear

    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            decode, packed = module.forward, _quantize_weight(module.dequantized().clone())

            def forward(x, decode=decode, packed=packed, m=module):
                if x.numel() // m.in_features <= 16:
                    return decode(x)
                y = _w8a8(x.reshape(-1, m.in_features), packed).view(*x.shape[:-1], m.out_features)
                return y if m.bias is None else y + m.bias

            module.forward = forward


def decode_perplexity(model, ids: torch.Tensor) -> float:
    """exp(mean NLL) of ids[1:] (1, T + 1), each token predicted by one decode step over the cache of the
    ones before it: the engine's decode path (fused native layers, quantized kernels, and the cache the
    engine's `auto` gives this model: its dtype, bf16 under quantized weights)."""
    from longctx.infer.engine import Engine
    from longctx.infer.generate import forward_last

    cache = Engine(model, None).cache_for(1, ids.shape[1])
    nll = 0.0
    for t in range(ids.shape[1] - 1):
        logits = forward_last(model, cache, ids[:, t : t + 1]).float()
        nll += F.cross_entropy(logits, ids[:, t + 1]).item()
    return float(torch.tensor(nll / (ids.shape[1] - 1)).exp())


def gemm_speedup(model, rows: int = 1024, reps: int = 5) -> float:
    """fp32 GEMM time / `_w8a8` time over one of each weight shape of a block, on random rows (best of reps)."""
    weights = {tuple(m.weight.shape): m.weight.detach() for m in model.blocks[0].modules()
               if isinstance(m, torch.nn.Linear)}  # fmt: skip
    packed = {shape: _quantize_weight(w) for shape, w in weights.items()}
    xs = {shape: torch.randn(rows, shape[1]) for shape in weights}

    def best(fn) -> float:
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            for shape in weights:
                fn(shape)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    with torch.inference_mode():
        fp32 = best(lambda s: F.linear(xs[s], weights[s]))
        int8 = best(lambda s: _w8a8(xs[s], packed[s]))
    return fp32 / int8


if __name__ == "__main__":
    main()
