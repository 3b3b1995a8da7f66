"""The native CPU training kernels (longctx/kernels) against torch's own ops on the same tensors, forward +
backward, `base` shapes: causal attention (8 heads of 64, the model's (B, T, H, hd) layout), RMSNorm
(T x 512), SwiGLU (T x 1376); where the bf16 attention kernels exist, bf16 attention too (ours in bf16, the fp32
kernels on copies, each against torch's bf16). Prints each time (the fastest of --repeats, sides interleaved) and the ratio. With --steps N, also N whole
training steps of `base` (chunked loss, fused AdamW) alternating the native kernels on and off in this one
process, so a busy neighbour slows both sides alike.

    python bench/cpu_kernels.py --tokens 4096
    python bench/cpu_kernels.py --tokens 4096 --steps 4
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from longctx import kernels
from longctx.attention.cpu_flash import bf16_kernels, flash_attention_bf16, flash_attention_cpu
from longctx.kernels import fused


def _fwd_bwd(fn, inputs, grad):
    out = fn(*inputs)
    torch.autograd.grad(out, inputs, grad)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--steps", type=int, default=0, help="also alternate N base training steps (first: warm-up)"
    )
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
    if bf16_kernels():  # bf16 training's attention: the bf16 kernels, and the fp32 ones on copies, vs torch's
        q16 = [t.detach().bfloat16().requires_grad_() for t in qkv()]
        g16 = torch.randn(1, 8, T, 64).bfloat16()

        def bf16(q, k, v):
            return flash_attention_bf16(q, k, v, True, 0, 0.125)[0]

        def copies(q, k, v):
            return flash_attention_cpu(q.float(), k.float(), v.float(), True, 0, 0.125)[0].bfloat16()

        def torch_bf16(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        cases["attn bf16"] = (bf16, torch_bf16, q16, g16)
        cases["attn copies"] = (copies, torch_bf16, q16, g16)
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

    if args.steps:
        _alternate_steps(T, args.steps)


def _alternate_steps(T: int, steps: int) -> None:
    from longctx.config import GPTConfig
    from longctx.model import GPT
    from longctx.train.loss import lm_loss
    from longctx.train.spec import OptimizerSpec, build_optimizer

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("base", max_seq_len=T))
    opt = build_optimizer(model.parameters(), OptimizerSpec(lr=1e-4))
    ids = torch.randint(0, model.config.vocab_size, (1, T + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(T)[None]}
    lib, times = kernels.library(), {True: [], False: []}
    for i in range(steps):
        for native in (False, True):
            # turned off as LONGCTX_NATIVE=0 leaves it (the loaded build's entry is a reason, not a library):
            # every wrapper then takes torch's path
            kernels._libs[None] = lib if native else "off for the comparison"
            try:
                t0 = time.perf_counter()
                lm_loss(model, batch).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i:  # the first round warms up
                    times[native].append(time.perf_counter() - t0)
            finally:
                kernels._libs[None] = lib
    if not times[True]:
        return
    on, off = min(times[True]), min(times[False])
    print(
        f"base training step, {T} tokens: native {on:.2f} s, torch's ops {off:.2f} s (fastest of "
        f"{len(times[True])} each), native/torch {on / off:.3f}"
    )


if __name__ == "__main__":
    main()
