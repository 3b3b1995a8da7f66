"""Perplexity with fp16, bf16 and int8 KV caches vs an fp32 one (and no cache at all), on held-out text.

    python bench/kv_cache_ppl.py                      # trains a tiny byte model for 150 steps first
    python bench/kv_cache_ppl.py --ckpt runs/tiny     # or measures a checkpoint
    python bench/kv_cache_ppl.py --chunk 1            # token by token: the decode path (native kernels)
    python bench/kv_cache_ppl.py --ckpt smollm2-135m-instruct --quantize int4 --seqs 1 --length 4096 --chunk 1

A checkpoint is read with its own tokenizer (the tiny model: bytes) and, with `--quantize`, its weights as
`--quantize` loads them (a GGUF's own blocks kept), to see what a cache dtype adds to a weight format's cost.

Text is fed through the cache in chunks (as generation does), so later chunks attend to the stored
(rounded or quantised) keys and values of the earlier ones; the no-cache row is one full forward per
sequence (the reference).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch
import torch.nn.functional as F

from longctx.checkpoint import gguf_blocks, load_model, load_tokenizer
from longctx.data.sources import is_validation, stdlib_files
from longctx.data.tokenizer import ByteTokenizer, Tokenizer
from longctx.infer.cache import make_cache
from longctx.infer.generate import forward_hidden
from longctx.infer.quant import quantize_model
from longctx.model import GPT


def held_out_sequences(n: int, length: int, tok: Tokenizer) -> torch.Tensor:
    """(n, length) token ids from standard-library files in the trainer's validation split."""
    rows = []
    for f in stdlib_files():
        if is_validation(f.name, 0.05):
            ids = tok.encode(f.read_text(encoding="utf-8", errors="replace"))
            if len(ids) >= length:
                rows.append(ids[:length])
        if len(rows) == n:
            break
    return torch.tensor(rows)


@torch.inference_mode()
def nll(model: GPT, ids: torch.Tensor, cache_kind: str | None, chunk: int) -> tuple[float, int]:
    """Mean next-token NLL over (B, T) ids, and the cache's bytes (0 without a cache)."""
    if cache_kind is None:
        logits = model(ids)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item(), 0
    cache = make_cache(model.config, ids.shape[0], ids.shape[1], kv_dtype=cache_kind)
    parts = [
        model.logits(forward_hidden(model, cache, ids[:, s : s + chunk]))
        for s in range(0, ids.shape[1], chunk)
    ]
    logits = torch.cat(parts, 1)[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    return loss, cache.nbytes


def trained_tiny(steps: int) -> GPT:
    from longctx.train.pretrain import TrainArgs, train

    out = tempfile.mkdtemp(prefix="kv-cache-")
    args = TrainArgs.from_flat(
        preset="tiny", steps=steps, seq_len=128, batch_size=8, lr=3e-3, out=out, quiet=True, device="cpu"
    )
    return train(args).model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None)
    p.add_argument("--steps", type=int, default=150, help="training steps when no --ckpt is given")
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="the checkpoint's weights so")
    args = p.parse_args()
    t0 = time.time()
    model = load_model(args.ckpt).eval() if args.ckpt else trained_tiny(args.steps)
    tok = load_tokenizer(args.ckpt) if args.ckpt else ByteTokenizer()
    n_params = model.num_parameters()  # before quantizing: QuantizedLinear holds its blocks as buffers
    if args.quantize:
        quantize_model(model, args.quantize, gguf_blocks(args.ckpt) if args.ckpt else None)
    ids = held_out_sequences(args.seqs, min(args.length, model.config.max_seq_len), tok)
    if len(ids) == 0:
        raise SystemExit(f"no held-out file has {args.length} tokens; lower --length")
    weights = f"weights {args.quantize}" if args.quantize else "fp32 weights"
    print(
        f"model: {n_params / 1e6:.2f}M params, {weights}; {ids.shape[0]} held-out sequences x "
        f"{ids.shape[1]} tokens, chunks of {args.chunk} (setup {time.time() - t0:.0f}s)"
    )
    rows = {
        kind or "none": nll(model, ids, kind, args.chunk) for kind in (None, "fp32", "fp16", "bf16", "int8")
    }
    base_loss, base_bytes = rows["fp32"]
    print(f"{'cache':<8}{'nll':>10}{'ppl':>10}{'ppl vs fp32':>14}{'cache bytes':>14}{'bytes vs fp32':>15}")
    for kind, (loss, nbytes) in rows.items():
        rel = math.exp(loss) / math.exp(base_loss) - 1
        size = f"{nbytes / base_bytes:.3f}x" if nbytes else "-"
        print(f"{kind:<8}{loss:>10.5f}{math.exp(loss):>10.4f}{rel:>+13.3%} {nbytes:>14,}{size:>15}")


if __name__ == "__main__":
    main()
