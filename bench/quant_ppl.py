"""What weight formats cost in perplexity, on held-out standard-library files, against fp32 (same run).

    python bench/quant_ppl.py                                    # the pulled SmolLM2, 2 windows of 4096
    python bench/quant_ppl.py --ckpt runs/base --length 2048 --windows 4

Rows: fp32 (the reference), bf16 weights, int8 (Q8_0 blocks quantized at load), int4 as `--quantize int4`
loads it (a GGUF's own Q4_0/Q4_1 blocks kept as they are: for the pulled SmolLM2, whose fp32 weights are its
Q4_1 file dequantized, that is no rounding at all), and int4 requantized to Q4_0 from the fp32 weights (what
a model with no quantized file gets). Each row also runs a few greedy decode steps through the quantized
kernels (the path `generate` and `serve` take) and says whether the tokens match fp32's.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from longctx.checkpoint import gguf_blocks, load_model, load_tokenizer
    from longctx.data.cache import token_file
    from longctx.eval.ppl import perplexity
    from longctx.infer.engine import Engine, EngineSpec
    from longctx.infer.quant import quantize_model
    from longctx.infer.sampling import SamplingParams

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="smollm2-135m-instruct")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
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
        return model

    print(f"{args.ckpt}: {args.windows} held-out windows of {args.length} tokens")
    print(f"{'weights':<24}{'ppl':>9}{'vs fp32':>10}{'greedy 32 = fp32':>18}{'seconds':>9}")
    ref_ppl = ref_tokens = None
    for row in ("fp32", "bf16", "int8", "int4", "int4 (Q4_0 from fp32)"):
        t0 = time.perf_counter()
        model = build(row)
        with torch.inference_mode():
            ppl = perplexity(model, tokens, args.length, max_windows=args.windows, eos_id=tok.eos_id,
                             progress=False)["ppl"]  # fmt: skip
            out = Engine(model, None, EngineSpec(), stop_at_eos=False).generate(
                prompt, SamplingParams(max_tokens=32)
            )
        ref_ppl = ref_ppl or ppl
        ref_tokens = ref_tokens or out.token_ids
        n = next((i for i, (a, b) in enumerate(zip(out.token_ids, ref_tokens)) if a != b), None)
        same = "all" if n is None else f"first {n}"
        print(
            f"{row:<24}{ppl:>9.4f}{ppl / ref_ppl - 1:>+9.2%}{same:>18}{time.perf_counter() - t0:>9.0f}",
            flush=True,
        )
        del model
    print("(perplexity exp(mean NLL) over the windows; greedy: 32 tokens after 512 held-out tokens)")


if __name__ == "__main__":
    main()
