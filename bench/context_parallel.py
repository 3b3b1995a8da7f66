"""Context parallel: peak memory per rank and step time at C = 1, 2, 4 for the same total sequence length.

    python bench/context_parallel.py --preset tiny --seq-len 8192 --steps 2

Each C runs in its own group of C processes (gloo on CPU, nccl on CUDA), spawned here; C=1 is the plain
one-process step (the model's own attention backend) and the baseline of the ratios. Memory is the peak
resident set (ru_maxrss) per rank on CPU, max_memory_allocated on CUDA; "step" is the peak minus the
resident size just before the first step, i.e. what the forward/backward itself added (activations,
gradients, the (k, v) blocks in flight), which is what context parallelism divides by C.

On a CPU machine with fewer cores than C the step time measures time-slicing, not scaling: C processes
share the cores, so the wall time can only grow with C. The step-time column is meaningful on one GPU per
rank; here it shows the overhead (ring messages through gloo, C x more Python dispatch).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from longctx.train.memory import peak_rss_bytes


def _rss_bytes() -> int:
    return peak_rss_bytes()


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from longctx import parallel
    from longctx.config import GPTConfig
    from longctx.model import GPT
    from longctx.train.loss import lm_loss

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    setup = parallel.init(dp=1, cp=world, device=args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset, max_seq_len=args.seq_len)).to(setup.device)
    train_model = setup.wrap_model(model, "ddp")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len + 1), generator=g).to(setup.device)
    batch = {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "position_ids": torch.arange(args.seq_len, device=setup.device)[None],
    }
    cuda = setup.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
    before = torch.cuda.memory_allocated(setup.device) if cuda else _rss_bytes()
    times = []
    for _ in range(args.steps + 1):  # the first step warms up (allocator, lazy inits) and is not timed
        setup.barrier()
        t0 = time.perf_counter()
        with setup.context(batch) as local:
            loss = setup.reduce_loss(lm_loss(train_model, local), local["labels"])
        loss.backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(setup.device)
        setup.barrier()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(setup.device) if cuda else _rss_bytes()
    rec = {
        "cp": world,
        "rank": rank,
        "peak": peak,
        "step_mem": peak - before,
        "step_s": sum(times[1:]) / max(1, len(times) - 1),
        "loss": float(loss.detach()),
    }
    with open(Path(out) / f"cp{world}-rank{rank}.json", "w") as fh:
        json.dump(rec, fh)
    setup.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--cp", default="1,2,4", help="comma-separated context-parallel sizes")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (needs one GPU per rank)")
    args = p.parse_args()
    sizes = [int(c) for c in args.cp.split(",")]
    with tempfile.TemporaryDirectory() as out:
        for c in sizes:
            # every C in fresh processes (C=1 too: no process group, the plain attention), because Linux
            # carries ru_maxrss across fork/exec: a child's peak would start at this process's
            mp.spawn(_worker, args=(c, _free_port(), args, out), nprocs=c, join=True)
        recs = [json.loads(f.read_text()) for f in sorted(Path(out).glob("*.json"))]
    rows = {c: [r for r in recs if r["cp"] == c] for c in sizes}
    base = rows[sizes[0]]
    b_mem = max(r["step_mem"] for r in base)
    b_time = max(r["step_s"] for r in base)
    print(
        f"\ncontext parallel, preset {args.preset}, total length {args.seq_len}, device {args.device}, "
        f"{os.cpu_count()} cores"
    )
    print(
        f"{'C':>3} | {'tokens/rank':>11} | {'peak/rank MiB':>13} | {'step mem/rank MiB':>17} | "
        f"{'vs C=' + str(sizes[0]):>8} | {'step s':>7} | {'vs C=' + str(sizes[0]):>8} | loss"
    )
    for c in sizes:
        peak = max(r["peak"] for r in rows[c])
        mem = max(r["step_mem"] for r in rows[c])
        t = max(r["step_s"] for r in rows[c])
        print(
            f"{c:>3} | {args.seq_len // c:>11} | {peak / 2**20:>13.0f} | {mem / 2**20:>17.0f} | "
            f"{mem / b_mem:>8.2f} | {t:>7.2f} | {t / b_time:>8.2f} | {rows[c][0]['loss']:.5f}"
        )


if __name__ == "__main__":
    main()
