"""Profile one training step of a preset (the trainer's step: its objective's chunked loss with buffers kept
across steps, fused AdamW, checkpointing and the memory setup of `prepare_for_training`): the step time and
the ops that take it, by self time on the device.

    python bench/profile_step.py --preset base --seq-len 4096 --checkpointing all
    python bench/profile_step.py --preset medium --seq-len 8192 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from longctx.config import GPTConfig
from longctx.model import GPT
from longctx.train.memory import autocast_context, prepare_for_training
from longctx.train.objectives import TokenLoss
from longctx.train.spec import OptimizerSpec, StepShape, build_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--checkpointing", default="all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=20)
    p.add_argument(
        "--by-shape", action="store_true", help="one row per op and input shapes (which copy_ costs)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    L, dev = args.seq_len, torch.device(args.device)
    config = GPTConfig.from_preset(args.preset, max_seq_len=L)
    model = GPT(config).to(dev)
    shape = StepShape(config, L, checkpointing=args.checkpointing, precision=args.precision, device=dev.type)
    prepare_for_training(model, shape)
    objective = TokenLoss(shape.loss_chunk_size)
    opt = build_optimizer(model.parameters(), OptimizerSpec(lr=1e-4))  # the trainer's: fused AdamW

    def step():
        ids = torch.randint(0, model.config.vocab_size, (1, L + 1), device=dev)
        batch = {
            "input_ids": ids[:, :-1],
            "labels": ids[:, 1:],
            "position_ids": torch.arange(L, device=dev)[None],
        }
        with autocast_context(dev, args.precision):
            loss = objective.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())  # synchronises

    step()
    t0 = time.perf_counter()
    step()
    plain = time.perf_counter() - t0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities, record_shapes=args.by_shape) as prof:
        step()
    print(
        f"{args.preset} L={L} {args.device} {args.precision} checkpointing={args.checkpointing}: step {plain:.3f} s"
    )
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=args.by_shape)
    print(table.table(sort_by=key, row_limit=args.rows, max_name_column_width=60, max_shapes_column_width=70))


if __name__ == "__main__":
    main()
