"""The native CPU training kernels (longctx/kernels) against torch's own ops on the same tensors, forward +
backward, `base` shapes: causal attention (8 heads of 64, the model's (B, T, H, hd) layout), RMSNorm
(T x 512), SwiGLU (T x 1376). Prints each time (the fastest of --repeats, sides interleaved) and the ratio.

    python bench/cpu_kernels.py --tokens 4096
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from longctx import kernels
from longctx.attention.cpu_flash import flash_attention_cpu
from longctx.kernels import fused


def _fwd_bwd(fn, inputs, grad):
    out = fn(*inputs)
    torch.autograd.grad(out, inputs, grad)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if not kernels.available():
        raise SystemExit(f"native kernels unavailable: {kernels.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    T = args.tokens

    def qkv():
        return [torch.randn(1, T, 8, 64).transpose(1, 2).requires_grad_() for _ in range(3)]

    x, w = torch.randn(T, 512, requires_grad=True), torch.rand(512, requires_grad=True)
    a, b = torch.randn(T, 1376, requires_grad=True), torch.randn(T, 1376, requires_grad=True)
    cases = {
        "attention": (
            lambda q, k, v: flash_attention_cpu(q, k, v, True, 0, 0.125)[0],
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            qkv(),
            torch.randn(1, 8, T, 64),
        ),
        "rms_norm": (
            lambda x, w: fused.rms_norm(x, w, 1e-5),
            lambda x, w: F.rms_norm(x, (512,), w, 1e-5),
            [x, w],
            torch.randn(T, 512),
        ),
        "swiglu": (fused.swiglu, lambda a, b: F.silu(a) * b, [a, b], torch.randn(T, 1376)),
    }
    print(f"{T} tokens, {args.threads} threads, forward + backward, fastest of {args.repeats}")
    for name, (ours, ref, inputs, grad) in cases.items():
        best = {"ours": float("inf"), "torch": float("inf")}
        for _ in range(args.repeats):
            for side, fn in (("ours", ours), ("torch", ref)):
                t0 = time.perf_counter()
                _fwd_bwd(fn, inputs, grad)
                best[side] = min(best[side], time.perf_counter() - t0)
        print(
            f"{name:<10} ours {best['ours'] * 1e3:8.2f} ms   torch {best['torch'] * 1e3:8.2f} ms   "
            f"ours/torch {best['ours'] / best['torch']:.2f}"
        )


if __name__ == "__main__":
    main()
