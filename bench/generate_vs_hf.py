"""longctx generation vs Hugging Face transformers on the same `base` weights (CPU).

    python bench/generate_vs_hf.py                       # prompts of 4096 and 16384 tokens, 128 new tokens
    python bench/generate_vs_hf.py --lengths 4096 --new-tokens 128 --threads 2 --kv-cache fp32

The `base` preset's weights are copied into a transformers LlamaForCausalLM (same names but attn_norm ->
input_layernorm, mlp_norm -> post_attention_layernorm, tok_emb -> embed_tokens). Each side runs in its own
subprocess so peak RSS is its own: prefill of the prompt (ours: 512-token chunks into a preallocated cache,
last-position logits only; HF: one forward with `logits_to_keep=1` into a DynamicCache — HF's leanest
prefill), then greedy decoding of the new tokens (HF: a plain loop over `model(...)` with the cache, no
`generate()` overhead). Greedy tokens must be identical on both sides. Ours runs once per `--kv-cache`:
fp32 (exact, the default cache), fp16 / bf16 (half the cache memory; decode steps read the 16-bit values as
they are stored, prefill reads them through one layer's fp32 buffer) and int8 (keys/values quantised per
head and token; dequantised one layer at a time on read), so the table shows what each cache buys in memory
and costs in speed and in exactness (the token check). Our decode steps run their matrix-vector products
and their attention through the native kernels of `longctx.infer.native` where they build (else oneDNN and
torch's attention); the header says which.

Decode is memory-bound: each token reads every weight (less the embedding table, of which one row) plus the
whole KV cache. `bandwidth` is the fraction of the limit (bytes per token / measured copy bandwidth, read +
write bytes per second as STREAM counts them) each side reaches. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SEED = 0


# -- weights on both sides -----------------------------------------------------------------------------
def hf_name(ours: str) -> str:
    """Our parameter name -> LlamaForCausalLM's."""
    name = ours.replace("blocks.", "model.layers.").replace(".attn.", ".self_attn.")
    name = name.replace("attn_norm", "input_layernorm").replace("mlp_norm", "post_attention_layernorm")
    name = name.replace("tok_emb", "model.embed_tokens")
    return "model.norm.weight" if name == "norm.weight" else name


def llama_config(config):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        torch_dtype="float32",
    )


def write_checkpoints(root: Path, max_len: int) -> tuple[Path, Path]:
    from transformers import LlamaForCausalLM

    from longctx import GPT, GPTConfig
    from longctx.checkpoint import save_checkpoint

    torch.manual_seed(SEED)
    # init std 0.05: a random model's next-token distribution must be peaked enough that float rounding
    # differences between the two implementations cannot flip a greedy choice
    model = GPT(GPTConfig.from_preset("base", max_seq_len=max_len, init_std=0.05)).eval()
    ours = save_checkpoint(root / "ours", model)
    hf = LlamaForCausalLM(llama_config(model.config)).eval()
    state = {hf_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    hf.save_pretrained(root / "hf")
    return ours, root / "hf"


# -- measurements in a child process -------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest resident set size while the block runs (sampled every 2 ms: torch ops release the GIL)."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def prompt_ids(length: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + length)
    return torch.randint(0, vocab, (1, length), generator=g)


@torch.inference_mode()
def child_ours(ckpt: str, length: int, new: int, kv: str = "fp32") -> dict:
    from longctx import kernels
    from longctx.checkpoint import load_model
    from longctx.infer.cache import make_cache
    from longctx.infer.generate import forward_last, prefill

    model = load_model(ckpt)
    kernels.available()  # builds the native kernels now if their sources changed, not inside the timing
    ids = prompt_ids(length, model.config.vocab_size)
    before = rss_bytes()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        cache = make_cache(model.config, 1, length + new, kv_dtype=kv)
        logits = prefill(model, cache, ids, chunk=512)
        prefill_s = time.perf_counter() - t0
    tokens = [int(logits.argmax(-1))]
    step = torch.empty(1, 1, dtype=torch.long)
    t0 = time.perf_counter()
    for _ in range(new - 1):
        step[0, 0] = tokens[-1]
        tokens.append(int(forward_last(model, cache, step).argmax(-1)))
    decode_s = time.perf_counter() - t0
    return dict(prefill_s=prefill_s, rss_before=before, peak_rss=peak.peak, decode_s=decode_s, tokens=tokens)


@torch.inference_mode()
def child_hf(ckpt: str, length: int, new: int) -> dict:
    from transformers import DynamicCache, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = prompt_ids(length, model.config.vocab_size)
    before = rss_bytes()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
    tokens = [int(out.logits[0, -1].argmax())]
    t0 = time.perf_counter()
    for _ in range(new - 1):
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    decode_s = time.perf_counter() - t0
    return dict(prefill_s=prefill_s, rss_before=before, peak_rss=peak.peak, decode_s=decode_s, tokens=tokens)


# -- the parent: run both, compare ---------------------------------------------------------------------
def copy_bandwidth(nbytes: int = 256 * 2**20, reps: int = 5) -> float:
    """Read + write bytes per second of a large tensor copy (the decode roofline)."""
    a = torch.randn(nbytes // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def bytes_per_token(config, context: int, kv: str = "fp32") -> float:
    """Weights read by one decode step (one embedding row, not the table) + the KV cache at `context`, whose
    values take 4 bytes (fp32), 2 (fp16, bf16) or 1 plus a 4-byte scale per head and token (int8)."""
    from longctx import GPT

    with torch.device("meta"):
        model = GPT(config)
    weights = sum(p.numel() for n, p in model.named_parameters() if "tok_emb" not in n) * 4
    value_bytes = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1 + 4 / config.head_dim}[kv]
    return weights + 2 * config.n_layer * context * config.n_kv_head * config.head_dim * value_bytes


def run_child(side: str, ckpt: Path, length: int, new: int, threads: int, kv: str = "fp32") -> dict:
    cmd = [
        sys.executable,
        __file__,
        *("--kv-cache", kv),
        "--child",
        side,
        "--ckpt",
        str(ckpt),
        "--lengths",
        str(length),
        "--new-tokens",
        str(new),
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--kv-cache",
        nargs="+",
        default=["fp32", "fp16"],
        choices=["fp32", "fp16", "bf16", "int8"],
        help="our cache, a row each: fp32 (exact) | fp16 | bf16 | int8",
    )
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        if args.child == "ours":
            res = child_ours(args.ckpt, args.lengths[0], args.new_tokens, args.kv_cache[0])
        else:
            res = child_hf(args.ckpt, args.lengths[0], args.new_tokens)
        print(json.dumps(res))
        return

    from longctx import kernels
    from longctx.checkpoint import load_config

    bw = copy_bandwidth()
    with tempfile.TemporaryDirectory(prefix="gen-vs-hf-") as tmp:
        ours_dir, hf_dir = write_checkpoints(Path(tmp), max(args.lengths) + args.new_tokens)
        config = load_config(ours_dir)
        print(
            f"base preset: {config.n_layer} layers, d={config.d_model}, vocab {config.vocab_size}; "
            f"{args.threads} threads; copy bandwidth {bw / 1e9:.1f} GB/s (read+write); "
            f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}; native decode kernels: "
            + kernels.describe()
        )
        header = (
            f"{'prompt':>7} {'side':<11}{'prefill s':>10}{'prefill MB':>11}{'peak RSS MB':>12}"
            f"{'decode tok/s':>13}{'bandwidth':>10}"
        )
        print(header)
        for length in args.lengths:
            res = {"hf": run_child("hf", hf_dir, length, args.new_tokens, args.threads)}
            for kv in args.kv_cache:
                res[f"ours {kv}"] = run_child("ours", ours_dir, length, args.new_tokens, args.threads, kv)
            context = length + args.new_tokens // 2
            for side, r in res.items():
                r["limit"] = bw / bytes_per_token(
                    config, context, side.split()[-1] if side != "hf" else "fp32"
                )
                r["tok_s"] = (args.new_tokens - 1) / r["decode_s"]
                r["prefill_mb"] = (r["peak_rss"] - r["rss_before"]) / 2**20
                print(
                    f"{length:>7} {side:<11}{r['prefill_s']:>10.2f}{r['prefill_mb']:>11.0f}"
                    f"{r['peak_rss'] / 2**20:>12.0f}{r['tok_s']:>13.2f}{r['tok_s'] / r['limit']:>10.1%}"
                )
            h = res["hf"]
            for side, o in res.items():
                if side == "hf":
                    continue
                same = h["tokens"] == o["tokens"]
                first_diff = next(
                    (i for i, (a, b) in enumerate(zip(h["tokens"], o["tokens"])) if a != b), None
                )
                print(
                    f"{length:>7} {side}/HF: decode {o['tok_s'] / h['tok_s']:.2f}x (target >= 2.5x), prefill time "
                    f"{o['prefill_s'] / h['prefill_s']:.2f}x, prefill memory {o['prefill_mb'] / h['prefill_mb']:.2f}x "
                    f"(target <= 0.5x at 16384); roofline {o['limit']:.1f} tok/s; greedy tokens identical: {same}"
                    + ("" if same else f" (first difference at token {first_diff})")
                )


if __name__ == "__main__":
    main()
