"""longctx inference vs llama.cpp and transformers on a real model, same weights, same prompt, same run.

    python bench/infer_vs_llamacpp.py                                # SmolLM2 (pulled), 4096-token prompt
    python bench/infer_vs_llamacpp.py --lengths 4096 16384 --new-tokens 64 --sides ours:fp32 llama:F32
    python bench/infer_vs_llamacpp.py --model path/to/model.gguf     # any llama/qwen2 GGUF longctx reads

The prompt is standard-library source code tokenized by the model's tokenizer (the same ids on every side).
Each side runs in its own subprocess (its own threads, memory and peak RSS): prefill of the prompt, then
`--new-tokens` greedy tokens, timed apart. Sides (`--sides`, default all):

  ours:<weights>[:<kv>]   longctx's engine path: weights fp32 | bf16 | fp16 | int8 | int4 (weight-only,
                          ggml blocks: see longctx/infer/quant.py; prefill on bf16 arithmetic where the CPU
                          runs it natively, `--dtype auto`), KV cache fp32 | fp16 | bf16 (default: fp32 for
                          fp32 weights, bf16 for bf16, fp16 for the others)
  hf:<fp32|bf16>          transformers' LlamaForCausalLM from the same weights (an HF directory exported by
                          longctx), sdpa attention, a plain decode loop with its DynamicCache
  llama:<type>            llama.cpp through llama-cpp-python (the `bench` extra): F32 is longctx's GGUF
                          export of the same weights; BF16 / F16 / Q8_0 / Q4_0 are made from it by llama.cpp's
                          own quantizer (llama_model_quantize); Q4_1 is the original file `longctx pull` kept.
                          Flash attention on or off, whichever prefills faster (`--llama-flash` to force).

Ratios are printed at equal weight bits (ours int8 vs Q8_0, int4 vs Q4_0/Q4_1, bf16 vs BF16, fp16 vs F16,
fp32 vs F32) and against transformers in the same dtype; greedy tokens are compared with transformers fp32.
The machine is shared and noisy: ratios from one run are what to read, not absolute numbers.

Prefill is compute-bound, so the summary also gives each side's prefill FLOPs per second as a share of
this CPU's fp32 matmul peak (measured in the same run, before and after the sides, the higher kept),
counting the model's FLOPs (2 per matmul weight per token, causal attention 2 L^2 hd per head and layer),
and ends with the ceiling: the prefill time at 100% of that peak, against transformers fp32. On a CPU
without native bf16 every side prefills on fp32 arithmetic (quantized or 16-bit weights are widened for
the GEMMs) or on slower emulated bf16, so none can pass it. On a CPU with native bf16 the bf16 matmul peak
is measured as well, with the bf16 ceiling against transformers bf16 and llama.cpp BF16: what the prefill
targets can reach on this CPU at all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate_vs_hf import PeakRSS, copy_bandwidth, rss_bytes  # noqa: E402
from train_vs_hf import matmul_peak_flops  # noqa: E402

DEFAULT_SIDES = [
    "hf:fp32", "hf:bf16",
    "ours:fp32", "ours:fp32:fp16", "ours:bf16", "ours:int8", "ours:int4",
    "llama:F32", "llama:BF16", "llama:Q8_0", "llama:Q4_0", "llama:Q4_1",
]  # fmt: skip
BITS = {"fp32": "F32", "bf16": "BF16", "fp16": "F16", "int8": "Q8_0", "int4": ("Q4_0", "Q4_1")}


def prefill_flops(config, length: int) -> float:
    """Model FLOPs of prefilling `length` tokens: the blocks' matmuls on every token, causal attention
    (QK^T and PV over L^2/2 pairs, 2 hd FLOPs each), the LM head on the last token only."""
    from longctx.train.planner import param_counts

    _, matmul, _ = param_counts(config)
    head = config.vocab_size * config.d_model
    attention = 2 * config.n_layer * config.n_head * config.head_dim * length**2
    return 2 * (matmul - head) * length + attention + 2 * head


def prompt_ids(tokenizer, length: int) -> list[int]:
    from longctx.data.sources import stdlib_files

    ids: list[int] = []
    for f in stdlib_files():
        ids += tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= length:
            return ids[:length]
    raise SystemExit(f"the standard library has fewer than {length} tokens here")


# -- the children ----------------------------------------------------------------------------------------
@torch.inference_mode()
def child_ours(ckpt: str, ids: list[int], new: int, weights: str, kv: str) -> dict:
    from longctx import kernels
    from longctx.infer.engine import EngineSpec, load_engine
    from longctx.infer.generate import forward_last, prefill

    quantize = weights if weights in ("int8", "int4") else None
    # quantized: dtype auto is the prefill's arithmetic, bf16 where the CPU runs it natively
    # (LONGCTX_AUTO_PRECISION=fp32 pins fp32)
    spec = EngineSpec(
        dtype="auto" if quantize else weights, quantize=quantize, kv_dtype=kv, prefill_chunk=1024
    )
    engine = load_engine(ckpt, spec, "cpu", quiet=True)
    kernels.available()  # builds the native kernels now if their sources changed, not inside the timing
    model, x = engine.model, torch.tensor([ids])
    before = rss_bytes()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        cache = engine.cache_for(1, len(ids) + new)
        logits = prefill(model, cache, x, spec.prefill_chunk)
        prefill_s = time.perf_counter() - t0
    tokens = [int(logits.argmax(-1))]
    step = torch.empty(1, 1, dtype=torch.long)
    t0 = time.perf_counter()
    for _ in range(new - 1):
        step[0, 0] = tokens[-1]
        tokens.append(int(forward_last(model, cache, step).argmax(-1)))
    return dict(prefill_s=prefill_s, decode_s=time.perf_counter() - t0, tokens=tokens, rss_before=before,
                peak_rss=peak.peak)  # fmt: skip


@torch.inference_mode()
def child_hf(hf_dir: str, ids: list[int], new: int, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype, attn_implementation="sdpa").eval()
    before = rss_bytes()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), past_key_values=DynamicCache(config=model.config), use_cache=True,
                    logits_to_keep=1)  # fmt: skip
        prefill_s = time.perf_counter() - t0
    tokens = [int(out.logits[0, -1].argmax())]
    t0 = time.perf_counter()
    for _ in range(new - 1):
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return dict(prefill_s=prefill_s, decode_s=time.perf_counter() - t0, tokens=tokens, rss_before=before,
                peak_rss=peak.peak)  # fmt: skip


def child_llama(gguf: str, ids: list[int], new: int, threads: int, flash: bool) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=len(ids) + new + 8, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, flash_attn=flash, verbose=False)  # fmt: skip

    def last_argmax() -> (
        int
    ):  # without logits_all, llama.cpp keeps the logits of each batch's last token only
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    before = rss_bytes()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill_s = time.perf_counter() - t0
    tokens = [last_argmax()]
    t0 = time.perf_counter()
    for _ in range(new - 1):
        llm.eval([tokens[-1]])
        tokens.append(last_argmax())
    return dict(prefill_s=prefill_s, decode_s=time.perf_counter() - t0, tokens=tokens, rss_before=before,
                peak_rss=peak.peak, flash=flash)  # fmt: skip


# -- the files each side reads ---------------------------------------------------------------------------
def llama_file(kind: str, work: Path, model: str) -> Path:
    """The GGUF llama.cpp runs for `kind`: made once into `work`."""
    from longctx.checkpoint import export_to_gguf, recover

    src = recover(Path(model))
    if kind == "Q4_1" and (src / "model.gguf").exists():
        return src / "model.gguf"  # the file longctx pull kept: llama.cpp's own Q4_1
    f32 = work / "F32.gguf"
    if not f32.exists():
        export_to_gguf(src, f32, outtype="f32")
    if kind == "F32":
        return f32
    out = work / f"{kind}.gguf"
    if not out.exists():
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
        if rc != 0:
            raise SystemExit(f"llama.cpp could not quantize to {kind} (code {rc})")
    return out


def hf_dir(work: Path, model: str) -> Path:
    from longctx.checkpoint import export_to_hf

    out = work / "hf"
    if not (out / "config.json").exists():
        export_to_hf(model, out)
    return out


def run_child(args: argparse.Namespace, side: str, target: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--target", target, "--model", args.model, "--lengths",
           str(length), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]  # fmt: skip
    if args.llama_flash is not None:
        cmd += ["--llama-flash", args.llama_flash]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(args: argparse.Namespace) -> None:
    from longctx.checkpoint import load_tokenizer

    torch.set_num_threads(args.threads)
    ids = prompt_ids(load_tokenizer(args.model), args.lengths[0])
    kind, _, rest = args.child.partition(":")
    if kind == "ours":
        weights, _, kv = rest.partition(":")
        kv = kv or {"fp32": "fp32", "bf16": "bf16"}.get(weights, "fp16")
        res = child_ours(args.model, ids, args.new_tokens, weights, kv)
    elif kind == "hf":
        res = child_hf(args.target, ids, args.new_tokens, rest)
    else:
        flashes = [args.llama_flash == "on"] if args.llama_flash else [False, True]
        runs = [child_llama(args.target, ids, args.new_tokens, args.threads, f) for f in flashes]
        res = min(runs, key=lambda r: r["prefill_s"])
        res["other_decode_s"] = [r["decode_s"] for r in runs if r is not res]
    print(json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a catalogue name, checkpoint or GGUF")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sides", nargs="+", default=DEFAULT_SIDES)
    p.add_argument("--llama-flash", choices=["on", "off"], default=None)
    p.add_argument("--work", default=None, help="folder for the converted files (default: a temporary one)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args)

    from longctx import kernels
    from longctx.device import cpu_flags, cpu_name

    flags = cpu_flags()
    kinds = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    print(f"{cpu_name()} ({', '.join(kinds)}), {args.threads} threads, {os.cpu_count()} cpus, load "
          f"{os.getloadavg()[0]:.1f}; copy bandwidth {copy_bandwidth() / 1e9:.1f} GB/s; longctx native kernels: "
          f"{kernels.describe()}")  # fmt: skip
    from longctx.checkpoint import load_config
    from longctx.device import cpu_has_native_bf16

    config = load_config(args.model)
    peak = matmul_peak_flops(args.threads)
    print(f"fp32 matmul peak ({args.threads} threads, best of 5): {peak / 1e9:.1f} GFLOP/s")
    bf16 = cpu_has_native_bf16()
    peak16 = matmul_peak_flops(args.threads, precision="bf16") if bf16 else None
    if peak16:
        print(f"bf16 matmul peak ({args.threads} threads, best of 5): {peak16 / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="infer-bench-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for length in args.lengths:
            res = {}
            print(f"\nprompt {length} tokens, {args.new_tokens} greedy tokens")
            flops = prefill_flops(config, length)
            print(f"{'side':<17}{'prefill s':>10}{'tok/s':>8}{'decode tok/s':>14}{'peak RSS MB':>13}"
                  "  tokens = hf:fp32")  # fmt: skip
            for side in args.sides:
                kind, _, rest = side.partition(":")
                target = ""
                if kind == "hf":
                    target = str(hf_dir(work, args.model))
                elif kind == "llama":
                    target = str(llama_file(rest, work, args.model))
                r = res[side] = run_child(args, side, target, length)
                if "error" in r:
                    print(f"{side:<17} failed: {r['error']}")
                    continue
                r["decode_tok_s"] = (args.new_tokens - 1) / r["decode_s"]
                ref = res.get("hf:fp32", {}).get("tokens")
                same = "-" if ref is None else _agreement(ref, r["tokens"])
                print(f"{side:<17}{r['prefill_s']:>10.2f}{length / r['prefill_s']:>8.0f}{r['decode_tok_s']:>14.1f}"
                      f"{r['peak_rss'] / 2**20:>13.0f}  {same}", flush=True)  # fmt: skip
            peak = max(peak, matmul_peak_flops(args.threads))  # a neighbour may have slowed the first one
            print(f"fp32 matmul peak after the sides: {peak / 1e9:.1f} GFLOP/s (the higher is kept)")
            if peak16:
                peak16 = max(peak16, matmul_peak_flops(args.threads, precision="bf16"))
                print(f"bf16 matmul peak after the sides: {peak16 / 1e9:.1f} GFLOP/s (the higher is kept)")
            _ratios(res, length, flops, peak, peak16)


def _agreement(ref: list[int], got: list[int]) -> str:
    n = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    return "identical" if n is None else f"first {n} identical"


def _ratios(res: dict, length: int, flops: float, peak: float, peak16: float | None) -> None:
    ok = {s: r for s, r in res.items() if "error" not in r}
    print(
        f"prefill FLOPs per second as a share of the fp32 matmul peak ({flops / 1e12:.2f} TFLOP at {length}):"
    )
    print("  " + ", ".join(f"{side} {flops / r['prefill_s'] / peak:.0%}" for side, r in ok.items()))
    if peak16:  # the sides on bf16 arithmetic: 16-bit weights, and ours quantized (bf16 prefill under auto)
        on16 = {s: r for s, r in ok.items() if s.split(":")[1] in ("bf16", "int8", "int4", "BF16")}
        print(
            "  of the bf16 matmul peak: "
            + ", ".join(f"{s} {flops / r['prefill_s'] / peak16:.0%}" for s, r in on16.items())
        )
    print(f"ratios at {length} (longctx / baseline; decode: tok/s, prefill: tokens/s)")
    for side, r in ok.items():
        if not side.startswith("ours:"):
            continue
        weights = side.split(":")[1]
        theirs = BITS[weights]
        for t in theirs if isinstance(theirs, tuple) else (theirs,):
            other = ok.get(f"llama:{t}")
            if other:
                print(f"  {side} vs llama.cpp {t}: decode {r['decode_tok_s'] / other['decode_tok_s']:.2f}x "
                      f"(target 1.2x), prefill {other['prefill_s'] / r['prefill_s']:.2f}x (target 4x)")  # fmt: skip
        name = f"hf:{weights}" if f"hf:{weights}" in ok else "hf:fp32"
        hf = ok.get(name)
        if hf:
            print(f"  {side} vs transformers {name[3:]}: decode {r['decode_tok_s'] / hf['decode_tok_s']:.2f}x "
                  f"(target 3x), prefill {hf['prefill_s'] / r['prefill_s']:.2f}x (target 1.5x)")  # fmt: skip
    hf = ok.get("hf:fp32")
    if hf:
        print(
            f"  ceiling: the prefill's FLOPs at 100% of the fp32 matmul peak take {flops / peak:.2f} s, "
            f"{hf['prefill_s'] * peak / flops:.2f}x transformers fp32's prefill"
        )
    if peak16:
        against = [
            (n, ok[s])
            for n, s in (("transformers bf16", "hf:bf16"), ("llama.cpp BF16", "llama:BF16"))
            if s in ok
        ]
        print(
            f"  bf16 ceiling: at 100% of the bf16 matmul peak they take {flops / peak16:.2f} s"
            + "".join(f", {r['prefill_s'] * peak16 / flops:.2f}x {n}'s prefill" for n, r in against)
        )


if __name__ == "__main__":
    main()
