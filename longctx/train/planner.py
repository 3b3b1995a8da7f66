"""Predict the peak memory of a training step, and the longest context that fits a budget (`longctx plan`).

The model of memory, per component (P parameters, N = batch * seq_len tokens, fp32 = 4 bytes):
    weights        4 P                         (fp32 master weights, also under bf16 autocast)
    gradients      4 P, from the backward on (the trainer frees them after each step)
    optimizer      8 P (adamw/adam: exp_avg + exp_avg_sq), 4 P (sgd: momentum)
    activations    N * floats per token: saved tensors of the blocks not checkpointed, the inputs, attention
                   outputs and MLP inputs of the checkpointed ones, one attention branch re-materialised in
                   the backward (+ one MLP tile), the embedding output and final norm
    attention      the workspace of the attention kernel (O(N): flash / chunked kernels)
    loss           the chunked loss: one (chunk, V) logits block + temporary, grad_h (N, d), grad_W (V, d)
    overhead       the framework (Python + torch RSS on CPU) and the optimizer's temporaries
The peak is the largest of three moments (`plan_memory`). The constants were calibrated against the peak
RSS of two training steps in a fresh subprocess (`measure_step`: hidden_states + lm_loss + backward + fused
AdamW step, the trainer's step, with its allocator setting) on a 2-core AVX2 CPU, torch 2.13: tiny/small/
base presets, 1024-16384 tokens, checkpointing none/all/every:2, all within 12% (most within 5-9%: glibc's
heap moves the measured peak by ~0.1 GB from run to run); tests/train/test_planner.py checks ±15%.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field

from longctx.attention.cpu_flash import upcasts_half_training
from longctx.config import GPTConfig
from longctx.errors import ConfigError
from longctx.train.memory import DEFAULT_MLP_CHUNK, checkpointed_blocks, mlp_tile_tokens, parse_checkpointing
from longctx.train.spec import OPTIMIZERS, PRECISIONS, StepShape

FP32 = 4
GIB = 1024**3

# --- calibration constants (bytes), measured on a 2-core AVX2 CPU with torch 2.13; see measure_step ---
# RSS of Python + torch + longctx once a first step has run (kernels, thread pools, allocator arenas):
# about 220 MiB after import, 300 MiB after the first backward of a tiny model
CPU_FRAMEWORK_BYTES = 305 * 1024**2
# floats saved per token inside one un-checkpointed block, in units of (d_model, d_ff, n_head)
BLOCK_SAVED_D, BLOCK_SAVED_FF, BLOCK_SAVED_H = 16.0, 6.0, 1.0
# floats per token a checkpointed block keeps: its input, attention output (+ logsumexp) and MLP input
CKPT_SAVED_D, CKPT_SAVED_H = 3.0, 1.0
# floats per token in flight while a checkpointed block's attention branch is recomputed and
# back-propagated (norm, q/k/v, their gradients, the residual gradient), by device: on CPU (glibc returns
# freed activations at once, see memory.limit_allocator_retention) the measured slope of `base` from 1024
# to 32768 tokens, checkpointed, is ~80-87 KiB/token, which leaves ~7 d for this; on CUDA the caching
# allocator keeps more in flight (H200, `medium`, 8K-256K: 15 d puts the predictions at 0.92-1.00)
CKPT_BWD_D = {"cpu": 7.0, "cuda": 15.0}
# floats per token of one MLP tile being recomputed and back-propagated (norm out, gate/up/act, gradients)
TILE_D, TILE_FF = 0.0, 1.0
# floats per token outside the blocks: embedding output, final norm in/out, grad of the residual stream
OUTER_SAVED_D = 6.0


@dataclass
class Plan:
    shape: StepShape
    breakdown: dict[str, int] = field(default_factory=dict)
    moment: str = ""  # when the peak happens: the loss, a recomputing backward, or the optimizer step

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    def to_dict(self) -> dict:
        return {
            **self.shape.to_dict(),
            "breakdown": self.breakdown,
            "moment": self.moment,
            "total": self.total,
        }

    def table(self) -> str:
        rows = [
            f"  {name:<22} {fmt_bytes(b):>10}  {100 * b / max(self.total, 1):5.1f}%"
            for name, b in self.breakdown.items()
        ]
        s = self.shape
        head = (
            f"seq_len {s.seq_len}, batch {s.batch}, checkpointing {s.checkpointing}, "
            f"precision {s.precision}, optimizer {s.optimizer}, loss chunk {s.loss_chunk_size}, "
            f"device {s.device}"
        )
        total = f"  {'total (predicted peak)':<22} {fmt_bytes(self.total):>10}  at the {self.moment}"
        return "\n".join([head, *rows, total])


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    """'20GiB', '20G', '512MiB', '1.5TB', '123456' -> bytes (binary units for K/M/G/T, with or without iB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot read memory size {text!r}; write it like 20GiB, 512MiB or 8G")
    scale = 1024 ** " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * scale)


def param_counts(config: GPTConfig) -> tuple[int, int, int]:
    """(total, matmul, largest tensor) parameter counts, without building the model."""
    d, f, V, hd = config.d_model, config.d_ff, config.vocab_size, config.head_dim
    H, K = config.n_head, config.n_kv_head
    attn = d * H * hd + 2 * d * K * hd + H * hd * d
    mlp = (3 if config.mlp == "swiglu" else 2) * d * f
    norms = 2 * d
    biases = 0
    if config.bias or config.qkv_bias:
        biases += H * hd + 2 * K * hd
    if config.bias:
        biases += d + f * (2 if config.mlp == "swiglu" else 1) + d
    block = attn + mlp + norms + biases
    emb = V * d
    head = 0 if config.tie_embeddings else V * d
    learned_pos = config.max_seq_len * d if config.position == "learned" else 0
    total = emb + head + config.n_layer * block + d + learned_pos
    matmul = config.n_layer * (attn + mlp) + V * d  # the head (tied or not) is a matmul
    return total, matmul, max(emb, d * f, d * H * hd)


def _saved_floats(n_layer: int, every: int, block: float, ckpt: float, bwd: float) -> tuple[float, float]:
    """Floats per token the blocks hold (end of the forward, worst moment of a recomputing backward).

    At the end of the forward every block holds its saved tensors (a checkpointed one: its input, attention
    output and MLP input). In the backward of a checkpointed block i the blocks below still hold theirs,
    those above are freed, and block i's attention branch is re-materialised with its gradients in flight
    (`bwd`; its MLP tile is counted apart, it does not grow with length). Without checkpointing the
    backward only frees memory."""
    chosen = set(checkpointed_blocks(n_layer, every))
    forward_end = sum(ckpt if i in chosen else block for i in range(n_layer))
    backward = 0.0
    for i in chosen:
        below = sum(ckpt if j in chosen else block for j in range(i))
        backward = max(backward, below + ckpt + bwd)
    return forward_end, backward


def plan_memory(shape: StepShape) -> Plan:
    """Predicted peak memory of one training step, with its breakdown (bytes) at the peak's moment.

    Three moments compete (the trainer frees gradients with zero_grad(set_to_none=True) after each step):
    the loss at the end of the forward (activations + loss workspace, no gradients yet), the backward of a
    checkpointed block (its recomputation + the gradients so far), and the optimizer step (gradients +
    the optimizer's temporaries). Weights, optimizer state and the framework are there throughout."""
    config, device, precision, loss_chunk_size = (
        shape.config,
        shape.device,
        shape.precision,
        shape.loss_chunk_size,
    )
    every = parse_checkpointing(shape.checkpointing)
    d, f, V, H, L = config.d_model, config.d_ff, config.vocab_size, config.n_head, config.n_layer
    N = shape.tokens
    total_p, _, largest = param_counts(config)
    # bf16 autocast: activations saved by matmuls are bf16 casts (half the bytes), elementwise ones stay
    # fp32 in our model (norms, residual); a coarse 0.6 factor, not calibrated
    act_scale = 0.6 if precision == "bf16" else 1.0
    per_token = N * FP32 * act_scale

    block_floats = BLOCK_SAVED_D * d + BLOCK_SAVED_FF * f + BLOCK_SAVED_H * H
    if precision == "bf16" and device == "cpu" and upcasts_half_training():
        # attention on fp32 copies (longctx.attention.cpu_flash): an un-checkpointed block also keeps q, k, v
        # and the output in fp32 (whole floats: not scaled as the bf16 casts are)
        block_floats += (2 * d + 2 * config.n_kv_head * config.head_dim) / act_scale
    ckpt_floats = CKPT_SAVED_D * d + CKPT_SAVED_H * H
    fwd_floats, bwd_floats = _saved_floats(
        L, every, block_floats, ckpt_floats, CKPT_BWD_D["cpu" if device == "cpu" else "cuda"] * d
    )
    # one MLP tile of a checkpointed block, recomputed with its gradients (longctx.train.memory)
    tile_ws = (
        min(mlp_tile_tokens(DEFAULT_MLP_CHUNK, device), N) * (TILE_D * d + TILE_FF * f) * FP32 * act_scale
    )
    # flash / chunked kernels: output + logsumexp + per-thread blocks, O(N); the grad of q, k, v in the bwd
    attn_ws = N * FP32 * 4 * d

    chunk = N if loss_chunk_size is None else min(loss_chunk_size, N)
    # chunked: one chunk's logits (fp32; on CPU in fp32 the log-softmax is taken in place, elsewhere it is a
    # second buffer), grad_h (N, d) and grad_W (V, d) kept for the backward; plain: logits, log-softmax and
    # their grad for all N tokens
    chunk_buffers = 1 if device == "cpu" and precision == "fp32" else 2
    loss_ws = (chunk_buffers * chunk * V + N * d + V * d) * FP32 if loss_chunk_size else 3 * N * V * FP32

    weights, grads = total_p * FP32, total_p * FP32
    opt_state = {"adamw": 2, "adam": 2, "sgd": 1}[shape.optimizer] * total_p * FP32  # sgd: momentum buffer
    # fused Adam/AdamW (the trainer's) needs no temporaries; single-tensor SGD allocates some the size of
    # the largest parameter
    opt_tmp = 2 * largest * FP32 if shape.optimizer == "sgd" else 0
    framework = CPU_FRAMEWORK_BYTES if device == "cpu" else 0
    moments = {
        "loss (end of forward)": {
            "gradients": 0,
            "activations": per_token * (fwd_floats + OUTER_SAVED_D * d),
            "attention workspace": attn_ws,
            "loss workspace": loss_ws,
            "optimizer temporaries": 0,
        },
        "optimizer step": {
            "gradients": grads,
            "activations": 0,
            "attention workspace": 0,
            "loss workspace": 0,
            "optimizer temporaries": opt_tmp,
        },
    }
    if bwd_floats:
        moments["backward (recomputation)"] = {
            "gradients": grads,
            "activations": per_token * (bwd_floats + OUTER_SAVED_D * d) + tile_ws,
            "attention workspace": attn_ws,
            "loss workspace": 0,
            "optimizer temporaries": 0,
        }
    moment, parts = max(moments.items(), key=lambda kv: sum(kv[1].values()))
    breakdown = {
        "weights": weights,
        "gradients": parts["gradients"],
        "optimizer state": opt_state,
        "activations": parts["activations"],
        "attention workspace": parts["attention workspace"],
        "loss workspace": parts["loss workspace"],
        "framework overhead": framework + parts["optimizer temporaries"],
    }
    return Plan(shape=shape, breakdown={k: int(v) for k, v in breakdown.items()}, moment=moment)


def max_seq_len_for_memory(
    shape: StepShape, budget_bytes: int, multiple_of: int = 256, limit: int = 1 << 24
) -> int:
    """The longest seq_len (a multiple of `multiple_of`) whose predicted peak fits `budget_bytes` with the
    rest of `shape` as it is (its own seq_len is ignored); 0 if none.

    Memory grows monotonically with length, so a bisection over multiples is exact for the model."""

    def fits(n_units: int) -> bool:
        return plan_memory(shape.replace(seq_len=n_units * multiple_of)).total <= budget_bytes

    lo, hi = 0, limit // multiple_of  # fits(lo) holds by convention; find the largest unit count that fits
    if not fits(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo * multiple_of


def choose_checkpointing(shape: StepShape, budget_bytes: int) -> str:
    """The fastest checkpointing whose predicted peak fits the budget: none, every:4, every:2, then all
    (`--checkpointing auto`; the shape's own checkpointing is ignored). Raises a ConfigError when even
    `all` does not fit."""
    candidates = ["none"] + [f"every:{k}" for k in (4, 2) if k < shape.config.n_layer] + ["all"]
    for spec in candidates:
        plan = plan_memory(shape.replace(checkpointing=spec))
        if plan.total <= budget_bytes:
            return spec
    raise ConfigError(
        f"{shape.seq_len} tokens x batch {shape.batch} need {fmt_bytes(plan.total)} even with checkpointing all, over the "
        f"{fmt_bytes(budget_bytes)} budget; lower --seq-len / --batch-size or raise --memory "
        f"(`longctx plan --memory ...` gives the longest length that fits)"
    )


# --- measurement: training steps in a fresh process, peak RSS from /proc ---------------------------------
def _spawn_measurement(shape: StepShape, steps: int = 2, threads: int | None = None) -> subprocess.Popen:
    spec = {"shape": shape.to_dict(), "steps": steps, "threads": threads}
    return subprocess.Popen(
        [sys.executable, "-m", "longctx.train.planner", "--measure-worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _collect(proc: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"measurement subprocess failed:\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def measure_step(
    shape: StepShape, steps: int = 2, threads: int | None = None, timeout: float = 600.0
) -> dict:
    """Run `steps` training steps of `shape` in a fresh subprocess; returns peak_rss, base_rss (after
    import), seconds of the fastest step after the first, and the loss (CUDA: `peak` =
    torch.cuda.max_memory_allocated; `oom` if it did not fit). A fresh process so the peak is this run's
    alone. Two steps by default: the second runs with the optimizer state already allocated, as every
    later step of a real run."""
    return _collect(_spawn_measurement(shape, steps, threads), timeout)


def measure_steps(
    shapes: list[StepShape], steps: int = 2, threads: int | None = None, timeout: float = 600.0
) -> list[dict]:
    """`measure_step` for several shapes at once, each in its own concurrent subprocess (peak RSS is per
    process, so running them side by side does not mix their numbers; timings would)."""
    procs = [_spawn_measurement(shape, steps, threads) for shape in shapes]
    return [_collect(p, timeout) for p in procs]


def fastest_after_first(times: list[float]) -> float:
    """The step time to report: the first step warms up, and noise on a shared machine only ever slows a
    step down, so the fastest of the others (the rule of the matmul peak's best-of-N)."""
    return min(times[1:]) if len(times) > 1 else times[0]


def _measure_worker(spec: dict) -> dict:
    import time

    import torch

    from longctx.device import peak_rss_bytes
    from longctx.model import GPT
    from longctx.train.loss import IGNORE_INDEX
    from longctx.train.memory import autocast_context, prepare_for_training
    from longctx.train.objectives import TokenLoss
    from longctx.train.spec import OptimizerSpec, build_optimizer

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    shape = StepShape.from_dict(spec["shape"])
    device = torch.device(shape.device)
    cuda = device.type == "cuda"
    base_rss = peak_rss_bytes()
    torch.manual_seed(0)
    config = shape.config
    B, T = shape.batch, shape.seq_len
    times, loss = [], float("nan")
    try:
        model = GPT(config).to(device)
        prepare_for_training(model, shape)  # checkpointing and the allocator, as the trainer does
        opt = build_optimizer(model.parameters(), OptimizerSpec(shape.optimizer, lr=1e-4))  # the trainer's
        objective = TokenLoss(shape.loss_chunk_size)  # and its loss, scratch buffers kept across steps
        for _ in range(spec["steps"]):
            ids = torch.randint(0, config.vocab_size, (B, T + 1), device=device)
            labels = ids[:, 1:].clone()
            labels[:, -1] = IGNORE_INDEX
            batch = {
                "input_ids": ids[:, :-1],
                "labels": labels,
                "position_ids": torch.arange(T, device=device).expand(B, T),
            }
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast_context(device, shape.precision):
                out = objective.loss(model, batch)
            out.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(out.detach())  # synchronises the device before the clock stops
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return {
            "oom": True,
            "peak_rss": 0,
            "peak": 0,
            "base_rss": base_rss,
            "seconds": float("nan"),
            "loss": float("nan"),
        }
    peak_rss = peak_rss_bytes()
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss
    return {
        "peak_rss": peak_rss,
        "peak": peak,
        "base_rss": base_rss,
        "seconds": fastest_after_first(times),
        "loss": loss,
    }


# --- the `longctx plan` command --------------------------------------------------------------------------
def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="base", help="model preset (tiny, small, base, medium)")
    p.add_argument("--config", default=None, help="a config.json instead of a preset")
    p.add_argument("--seq-len", type=int, default=None, help="predict the peak memory at this length")
    p.add_argument("--memory", default=None, help="a budget (e.g. 20GiB): print the longest length that fits")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--checkpointing",
        default=None,
        help="all | none | every:K (default: none with --seq-len, all with --memory)",
    )
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    p.add_argument("--loss-chunk-size", type=int, default=1024, help="0: plain loss with full logits")
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cpu counts the framework's RSS; cuda counts allocated tensor memory only",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    if (args.seq_len is None) == (args.memory is None):
        raise ConfigError(
            "give exactly one of --seq-len N (predict memory) or --memory SIZE (longest length)"
        )
    config = GPTConfig.load(args.config) if args.config else GPTConfig.from_preset(args.preset)
    default_ckpt = "none" if args.seq_len is not None else "all"
    shape = StepShape(
        config,
        args.seq_len or 1,
        args.batch,
        args.checkpointing or default_ckpt,
        args.precision,
        args.optimizer,
        args.loss_chunk_size or None,
        args.device,
    )
    extra = {}
    if args.memory is not None:
        budget = parse_bytes(args.memory)
        n = max_seq_len_for_memory(shape, budget)
        if n == 0:
            raise ConfigError(
                f"even 256 tokens do not fit in {fmt_bytes(budget)} with this model; "
                "raise --memory, use checkpointing, or a smaller preset"
            )
        shape, extra = shape.replace(seq_len=n), {"max_seq_len": n, "budget": budget}
    plan = plan_memory(shape)
    if args.json:
        print(json.dumps({**extra, **plan.to_dict()}))
    elif extra:
        print(
            f"longest trainable context in {fmt_bytes(extra['budget'])}: {extra['max_seq_len']} tokens\n{plan.table()}"
        )
    else:
        print(plan.table())
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-worker":
        print(json.dumps(_measure_worker(json.loads(sys.argv[2]))))
    else:
        raise SystemExit(
            "usage: python -m longctx.train.planner --measure-worker SPEC_JSON (use `longctx plan`)"
        )
