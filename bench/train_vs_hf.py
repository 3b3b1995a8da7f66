"""One training step, our `base` preset vs transformers.LlamaForCausalLM with the same shape, on CPU.

Both: d=512, 8 layers, 8 heads, SwiGLU 1376, vocab 32000, untied head, fp32, SDPA attention, AdamW, batch 1,
2 threads. Each (side, length) runs in its own subprocess, so peak RSS (VmHWM) is that side's alone;
one warm-up step, then one timed step. Our side, as the trainer runs it: chunked cross-entropy (no (L, V)
logits), fused AdamW, torch SDPA's flash CPU kernel, and once per checkpointing setting (default: `none`,
the fast one, and `all`, the lean one: attention branch checkpointed with its outputs kept, MLP in tiles).

    python bench/train_vs_hf.py                     # L = 1024, 4096, 8192
    python bench/train_vs_hf.py --long              # + 16384
    python bench/train_vs_hf.py --lengths 1024 4096 --checkpointing every:2
    python bench/train_vs_hf.py --lengths 4096 8192 --confirm 32768 --budget 20GiB
                                    # + ours alone at 32768 (planner vs measured), and the longest context
                                    # in 20 GiB: ours by the planner, HF by its measured memory slope
    python bench/train_vs_hf.py --preset medium --device cuda --precision bf16 --lengths 8192 32768 \
        --planner-max 70GiB                         # what bench/gpu.sh runs

Prints tokens/s, peak RSS, ratios ours/HF, the memory slope (bytes per extra token between consecutive
lengths), MFU against an fp32 matmul peak measured in the same run (model FLOPs: 6 per matmul parameter
per token plus causal attention 6 * n_layer * d * L per token; recomputation is not counted), and the
planner's prediction for our side. Timings on a shared machine are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def matmul_peak_flops(
    threads: int, device: str = "cpu", precision: str = "fp32", n: int = 2048, reps: int = 5
) -> float:
    """Best-of-`reps` GEMM throughput (FLOP/s): fp32 on CPU, or the training precision on a GPU."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 8192 if device == "cuda" else n
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    inner = 10 if device == "cuda" else 1
    best = float("inf")
    for i in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(inner):
            c = a @ b
        float(c[0, 0])  # synchronises
        if i:  # the first round is the warm-up
            best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n**3 / best


def flops_per_token(config, seq_len: int) -> float:
    """Model FLOPs per trained token: 6 per matmul parameter + causal attention (fwd + bwd)."""
    from longctx.train.planner import param_counts

    _, matmul_params, _ = param_counts(config)  # blocks + LM head (the embedding is a lookup)
    return 6 * matmul_params + 6 * config.n_layer * config.n_head * config.head_dim * seq_len


def _hf_step_worker(preset: str, seq_len: int, threads: int, steps: int, device: str, precision: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longctx.config import GPTConfig
    from longctx.train.memory import autocast_context, peak_rss_bytes

    torch.set_num_threads(threads)
    base_rss = peak_rss_bytes()
    torch.manual_seed(0)
    c = GPTConfig.from_preset(preset)
    cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        max_position_embeddings=seq_len,
        tie_word_embeddings=c.tie_embeddings,
        rms_norm_eps=c.norm_eps,
        attn_implementation="sdpa",
    )
    times, loss = [], float("nan")
    try:
        model = LlamaForCausalLM(cfg).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(steps):
            ids = torch.randint(0, c.vocab_size, (1, seq_len), device=device)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast_context(device, precision):
                out = model(input_ids=ids, labels=ids).loss  # HF shifts the labels inside
            out.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(out)  # synchronises
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return {
            "oom": True,
            "peak": 0,
            "peak_rss": 0,
            "base_rss": base_rss,
            "seconds": float("nan"),
            "loss": loss,
        }
    from longctx.train.planner import fastest_after_first  # the rule our side's worker uses too

    seconds = fastest_after_first(times)
    peak_rss = peak_rss_bytes()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss
    return {"peak": peak, "peak_rss": peak_rss, "base_rss": base_rss, "seconds": seconds, "loss": loss}


def _run_side(side: str, seq_len: int, args: argparse.Namespace, checkpointing: str = "none") -> dict:
    if side == "ours":
        from longctx.config import GPTConfig
        from longctx.train.planner import measure_step
        from longctx.train.spec import StepShape

        config = GPTConfig.from_preset(args.preset, max_seq_len=seq_len)
        shape = StepShape(
            config, seq_len, 1, checkpointing, args.precision, "adamw", args.loss_chunk_size, args.device
        )
        r = measure_step(shape, steps=args.steps, threads=args.threads, timeout=3600)
        return {**r, "peak": r.get("peak", r["peak_rss"])}
    cmd = [
        sys.executable,
        __file__,
        "--hf-worker",
        str(seq_len),
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--preset",
        args.preset,
        "--device",
        args.device,
        "--precision",
        args.precision,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"HF worker failed at L={seq_len}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_gib(r: dict) -> str:
    return "OOM" if r.get("oom") else f"{r['peak'] / 1024**3:.2f}G"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--long", action="store_true", help="add L = 16384")
    p.add_argument("--preset", default="base")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--steps",
        type=int,
        default=3,
        help="steps per side: the first warms up, the fastest of the rest counts",
    )
    p.add_argument(
        "--checkpointing", nargs="+", default=["none", "all"], help="ours, one row each: all | none | every:K"
    )
    p.add_argument(
        "--confirm", type=int, default=None, metavar="L", help="also ours alone at L (last setting)"
    )
    p.add_argument("--budget", default=None, help="compare the longest context in this budget (e.g. 20GiB)")
    p.add_argument("--loss-chunk-size", type=int, default=1024)
    p.add_argument(
        "--planner-max",
        default=None,
        metavar="BUDGET",
        help="also run at the planner's longest length for this memory budget (e.g. 70GiB)",
    )
    p.add_argument("--max-len", type=int, default=1 << 18, help="cap for --planner-max (time)")
    p.add_argument("--hf-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf_worker is not None:
        print(
            json.dumps(
                _hf_step_worker(
                    args.preset, args.hf_worker, args.threads, args.steps, args.device, args.precision
                )
            )
        )
        return

    from tqdm import tqdm

    from longctx.config import GPTConfig
    from longctx.train.planner import max_seq_len_for_memory, parse_bytes, plan_memory
    from longctx.train.spec import StepShape

    config = GPTConfig.from_preset(args.preset)
    lengths = sorted(set(args.lengths + ([16384] if args.long else [])))
    lean = args.checkpointing[-1]  # the planner's and the confirmation's setting
    if args.planner_max:
        n = max_seq_len_for_memory(
            StepShape(config, 1, 1, lean, args.precision, "adamw", args.loss_chunk_size, args.device),
            parse_bytes(args.planner_max),
        )
        print(
            f"planner: longest {args.preset} context in {args.planner_max}: {n} tokens"
            + (f" (capped at {args.max_len})" if n > args.max_len else "")
        )
        lengths = sorted(set(lengths + [min(n, args.max_len)]))
    peak = matmul_peak_flops(args.threads, args.device, args.precision)
    print(
        f"{args.precision} matmul peak ({args.device}, {args.threads} threads, best of 5): {peak / 1e9:.1f} "
        f"GFLOP/s; load average {os.getloadavg()[0]:.1f} (a shared machine: timings are noisy)"
    )
    sides = [("hf", "")] + [("ours", ck) for ck in args.checkpointing]
    results: dict[tuple[str, str, int], dict] = {}
    for L in tqdm(lengths, desc="lengths"):
        for side, ck in sides:
            r = results[side, ck, L] = _run_side(side, L, args, ck)
            # a line as each side finishes, so a run cut off by a time limit still reports what it did
            tqdm.write(
                f"  L={L} {side} {ck}: "
                + ("OOM" if r.get("oom") else f"{r['seconds']:.3f} s/step, peak {_fmt_gib(r)}")
            )
    if args.confirm:  # its job is the peak: two steps (a third would add minutes at long length)
        two = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 2)})
        results["ours", lean, args.confirm] = _run_side("ours", args.confirm, two, lean)

    # the peak again at the end, and the higher of the two counts: on a shared machine a neighbour can slow
    # the first measurement down (one run here read 125 GFLOP/s at the start, where 179 is usual), which
    # would inflate every MFU of the run
    peak_end = matmul_peak_flops(args.threads, args.device, args.precision)
    print(
        f"{args.precision} matmul peak at the end: {peak_end / 1e9:.1f} GFLOP/s; MFU is against the higher, "
        f"{max(peak, peak_end) / 1e9:.1f}"
    )
    peak = max(peak, peak_end)
    gib = 1024**3
    what = "peak RSS" if args.device == "cpu" else "max_memory_allocated"
    print(
        f"\n{args.preset}, {args.device}, {args.precision}; loss chunk {args.loss_chunk_size}; {args.steps} "
        f"steps per side (the fastest after the first); memory = {what}; ratios are ours/HF"
    )
    head = (
        f"{'L':>6} {'side':<10} | {'tok/s':>7} {'ratio':>6} | {'peak':>7} {'ratio':>6} | {'MFU':>6} | "
        f"{'planner':>8} {'pred/meas':>9}"
    )
    print(head + "\n" + "-" * len(head))
    for (side, ck, L), r in sorted(results.items(), key=lambda kv: (kv[0][2], kv[0][0] != "hf")):
        hf = results.get(("hf", "", L))
        tps = L / r["seconds"] if not r.get("oom") else float("nan")
        mfu = tps * flops_per_token(config, L) / peak
        name = "HF" if side == "hf" else f"ours {ck}"
        if hf is None or side == "hf":
            tps_ratio = mem_ratio = ""
        else:
            tps_ratio = f"{tps / (L / hf['seconds']):.2f}"
            mem_ratio = f"{r['peak'] / hf['peak']:.2f}" if hf["peak"] and r["peak"] else "-"
        planned = ""
        if side == "ours":
            pred = plan_memory(
                StepShape(
                    config.replace(max_seq_len=L), L, 1, ck, args.precision, "adamw", args.loss_chunk_size,
                    args.device,
                )
            ).total  # fmt: skip
            planned = f"{pred / gib:>7.2f}G {pred / r['peak'] if r['peak'] else float('nan'):>9.2f}"
        print(
            f"{L:>6} {name:<10} | {tps:>7.1f} {tps_ratio:>6} | {_fmt_gib(r):>7} {mem_ratio:>6} | {mfu:>6.1%} | "
            f"{planned}"
        )
    slopes = {}
    for side, ck in sides:
        done = sorted(L for (s_, c_, L), r in results.items() if (s_, c_) == (side, ck) and not r.get("oom"))
        for a, b in zip(done, done[1:]):
            slopes[side, ck, a, b] = (results[side, ck, b]["peak"] - results[side, ck, a]["peak"]) / (b - a)
    for (side, ck, a, b), sl in sorted(slopes.items(), key=lambda kv: kv[0][2:]):
        if side == "ours" and ("hf", "", a, b) in slopes:
            print(
                f"memory slope {a}->{b}: HF {slopes['hf', '', a, b] / 1024:.1f} KiB/token, ours {ck} "
                f"{sl / 1024:.1f} KiB/token, ours/HF {sl / slopes['hf', '', a, b]:.3f}"
            )
    if args.budget:
        budget = parse_bytes(args.budget)
        ours_max = max_seq_len_for_memory(
            StepShape(config, 1, 1, lean, args.precision, "adamw", args.loss_chunk_size, args.device), budget
        )
        hf_done = sorted(L for (s_, _, L), r in results.items() if s_ == "hf" and not r.get("oom"))
        line = f"longest context in {args.budget}: ours ({lean}) {ours_max} tokens by the planner"
        if len(hf_done) >= 2:  # HF: extrapolate its two longest measured points
            a, b = hf_done[-2:]
            sl = (results["hf", "", b]["peak"] - results["hf", "", a]["peak"]) / (b - a)
            hf_max = b + (budget - results["hf", "", b]["peak"]) / sl
            if hf_max > b:
                line += f"; HF ~{hf_max:.0f} tokens by its slope {a}->{b}; ours/HF {ours_max / hf_max:.1f}x"
            else:
                line += f"; HF is over it already at {b} tokens"
        print(line)


if __name__ == "__main__":
    main()
