"""The training loop: one function, `train(args)`, used by `longctx train`, `extend`, `finetune` and the demo.

Per optimizer step: the curriculum picks (seq_len, batch); `grad_accum` micro-batches are drawn as a pure
function of (seed, step, micro) — so a resumed run sees exactly the batches of an uninterrupted one —
the loss is computed by the chunked cross-entropy, gradients are clipped, the LR follows warmup+cosine.
One log line per interval (step, loss, lr, seq len, tokens/s, peak memory, ETA), a progress bar, and
`metrics.jsonl` in the run directory. Checkpoints are atomic (`longctx.checkpoint.save_checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from longctx.checkpoint import load_model, load_trainer_state, save_checkpoint
from longctx.config import GPTConfig
from longctx.data.cache import token_file
from longctx.data.packing import sample_batch
from longctx.data.tokenizer import Tokenizer, load_tokenizer
from longctx.errors import CheckpointError, ConfigError
from longctx.model import GPT
from longctx.train.memory import peak_rss_bytes
from longctx.train.schedules import Curriculum, lr_at

OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass
class TrainArgs:
    preset: str = "tiny"
    config_overrides: dict[str, Any] = field(default_factory=dict)
    data: str | None = None  # None: the embedded corpus (Python's standard library)
    tokenizer: str = "byte"
    seq_len: int = 256
    seq_len_schedule: str | None = None  # "128:0,256:1000" (length from a step on)
    memory: str | None = None  # with seq_len 0 ("auto"): the longest length the planner fits here
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    momentum: float = 0.9  # SGD only
    seed: int = 0
    device: str = "auto"
    out: str = "runs/train"
    resume: bool = False
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    early_stop_patience: int = 0  # evaluations without improvement before stopping; 0: never
    save_every: int = 0  # 0: only at the end
    log_every: int = 10
    restart_positions: bool = False  # positions restart at every document in a packed row
    retrieval_mix: float = 0.0  # share of rows replaced by synthetic passkey-style retrieval samples
    objective: str = "clm"  # clm: next token | mlm: masked tokens, bidirectional model (longctx.tasks.mlm)
    loss_chunk_size: int = 1024
    checkpointing: str = "none"  # activation checkpointing: none | all | every:K
    precision: str = "fp32"  # fp32 | bf16
    compile: bool = False
    cache_dir: str | None = None
    val_fraction: float = 0.05
    quiet: bool = False
    # parallel (longctx.parallel; launch with torchrun --nproc-per-node dp*cp)
    dp: int = 1  # data-parallel ranks: each draws different batches
    cp: int = 1  # context-parallel ranks: each holds 1/cp of every sequence (ring attention)
    dp_mode: str = "ddp"  # ddp | fsdp

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.steps >= 0, f"--steps must be >= 0, got {self.steps}")
        need(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        need(self.grad_accum > 0, f"--grad-accum must be positive, got {self.grad_accum}")
        need(
            self.seq_len > 0 or self.memory is not None,
            "--seq-len must be positive (or 'auto' together with --memory)",
        )
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose {OPTIMIZERS}")
        need(0.0 <= self.retrieval_mix <= 1.0, "--retrieval-mix must be in [0, 1]")
        need(self.objective in ("clm", "mlm"), f"unknown --objective {self.objective!r}; choose clm or mlm")
        need(self.precision in ("fp32", "bf16"), f"unknown precision {self.precision!r}; choose fp32 or bf16")
        need(
            self.checkpointing != "auto" or self.memory is not None,
            "--checkpointing auto needs --memory (the budget the step must fit, e.g. 20GiB)",
        )


@dataclass
class TrainResult:
    model: GPT
    out_dir: Path
    history: list[dict[str, Any]]
    final_val_loss: float | None
    stopped_early: bool = False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def fused_optimizer_ok(params: list[torch.Tensor]) -> bool:
    """torch's fused Adam/AdamW kernel (one pass per tensor: ~8x faster than the default loop on CPU,
    0.03 s vs 0.25 s per step on `base`, 2 cores) where it applies: plain (not sharded DTensor) float
    tensors on CPU or CUDA."""
    return all(
        type(p) in (torch.Tensor, torch.nn.Parameter)
        and p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        for p in params
    )


def build_optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameters (every parameter has requires_grad=False)")
    # weight decay on matrices only: decaying norms' gains and biases only hurts (GPT-2/nanoGPT practice)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if args.optimizer in ("adamw", "adam"):
        cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
        if args.optimizer == "adam":  # classic Adam: no decoupled decay
            for g in groups:
                g["weight_decay"] = 0.0
        return cls(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=fused_optimizer_ok(params))
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)


def _resolve_seq_len(args: TrainArgs, config: GPTConfig, device_type: str) -> None:
    if args.seq_len > 0:
        return
    from longctx.train.planner import max_seq_len_for_memory, parse_bytes

    if args.checkpointing == "auto":  # the longest length comes with the leanest setting
        args.checkpointing = "all"

    args.seq_len = max_seq_len_for_memory(
        config,
        parse_bytes(args.memory),
        batch=args.batch_size,
        checkpointing=args.checkpointing,
        precision=args.precision,
        optimizer=args.optimizer,
        device=device_type,
    )


@torch.no_grad()
def evaluate(
    model: GPT,
    val_tokens,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    seed: int,
    device: torch.device,
    loss_chunk: int,
    mlm_tokenizer: Tokenizer | None = None,
) -> float:
    """Mean validation loss over `n_batches` fixed batches (the same ones at every evaluation);
    masked-token loss when `mlm_tokenizer` is given (objective mlm)."""
    from longctx.train.loss import lm_loss

    was_training = model.training
    model.eval()
    losses = []
    for i in range(n_batches):
        batch = sample_batch(val_tokens, seq_len, batch_size, seed=seed + 10_007, step=i)
        if mlm_tokenizer is not None:
            from longctx.tasks.mlm import mlm_batch

            batch = mlm_batch(batch, mlm_tokenizer, seed=seed + 10_007, step=i)
        losses.append(float(lm_loss(model, {k: v.to(device) for k, v in batch.items()}, loss_chunk)))
    model.train(was_training)
    return sum(losses) / len(losses)


def train(
    args: TrainArgs,
    model: GPT | None = None,
    tokenizer: Tokenizer | None = None,
    export_model: Callable[[torch.nn.Module], GPT] | None = None,
) -> TrainResult:
    """Train `model` (or a new one from `args.preset` + overrides) and write checkpoints to `args.out`."""
    from longctx.train.loss import lm_loss

    args.validate()
    device = resolve_device(args.device)
    # --- parallel (longctx.parallel): a no-op setup on one process ---
    from longctx import parallel

    setup = parallel.init(args.dp, args.cp, device)
    device = setup.device
    if args.compile and setup.enabled:
        raise ConfigError("--compile is not supported together with --dp/--cp yet; drop one of them")
    args.quiet = args.quiet or not setup.is_main  # rank 0 prints and writes the run directory
    # --- end parallel ---
    out = Path(args.out)
    torch.manual_seed(args.seed)
    tokenizer = tokenizer or load_tokenizer(args.tokenizer)

    state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "best_val_loss": None, "bad_evals": 0}
    opt_state = None
    if args.resume and (out / "model.safetensors").exists():
        ts, opt_state = load_trainer_state(out)
        if ts is None or opt_state is None:
            raise CheckpointError(
                f"{out} has weights but no trainer state: it cannot be resumed "
                "(start a new run with another --out)"
            )
        state.update(ts)
        if model is None:
            model = load_model(out)
        else:
            from longctx.checkpoint import load_state

            load_state(model, load_model(out).state_dict(), source=str(out))
        if not args.quiet:
            print(f"resuming {out} at step {state['step']}")
    if model is None:
        overrides = dict(args.config_overrides)
        overrides.setdefault("vocab_size", tokenizer.vocab_size)
        if args.objective == "mlm":  # masked-token prediction trains the bidirectional encoder
            overrides.setdefault("causal", False)
        config = GPTConfig.from_preset(args.preset, **overrides)
        if "max_seq_len" not in args.config_overrides:
            # a new model's trained context is the longest length it will see here, not the preset's
            _resolve_seq_len(args, config, device.type)
            longest = Curriculum.parse(args.seq_len_schedule, args.seq_len, args.batch_size).max_len
            config = config.replace(max_seq_len=longest)
        model = GPT(config)
    config = model.config
    if args.objective == "mlm":
        from longctx.tasks.mlm import mlm_batch, require_encoder

        require_encoder(config)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{config.vocab_size}; set vocab_size >= {tokenizer.vocab_size}"
        )
    _resolve_seq_len(args, config, device.type)
    curriculum = Curriculum.parse(args.seq_len_schedule, args.seq_len, args.batch_size)
    if args.checkpointing == "auto":
        from longctx.train.planner import choose_checkpointing, parse_bytes

        args.checkpointing = choose_checkpointing(
            config,
            curriculum.max_len,
            parse_bytes(args.memory),
            args.batch_size,
            args.precision,
            args.optimizer,
            args.loss_chunk_size or None,
            device.type,
        )
        print(
            f"checkpointing auto: {args.checkpointing} (the fastest setting the planner fits in {args.memory})"
        )
    if config.position == "learned" and curriculum.max_len > config.max_seq_len:
        raise ConfigError(
            f"training length {curriculum.max_len} exceeds the learned position table "
            f"({config.max_seq_len}); set max_seq_len or extend the model first"
        )
    if curriculum.max_len > config.max_seq_len and config.rope_scaling is None:
        # the trained context is a property of the weights: record it in the config that gets saved
        config.max_seq_len = curriculum.max_len

    model.to(device)
    model.train()
    train_model: torch.nn.Module = model
    if args.checkpointing != "none":
        from longctx.train.memory import (
            allocator_threshold,
            apply_activation_checkpointing,
            limit_allocator_retention,
        )

        apply_activation_checkpointing(model, args.checkpointing)
        if device.type == "cpu":  # freed activations back to the OS: a lower, predictable peak RSS
            limit_allocator_retention(
                allocator_threshold(args.batch_size * curriculum.max_len, config.d_model)
            )
    if args.compile:
        from longctx.train.memory import maybe_compile

        train_model = maybe_compile(model, True)
    if setup.enabled:  # parallel: DDP/FSDP wrap before the optimizer (FSDP replaces the parameters)
        train_model = setup.wrap_model(model, args.dp_mode)
    autocast = contextlib.nullcontext
    if args.precision != "fp32":
        from longctx.train.memory import autocast_context

        def autocast():
            return autocast_context(device, args.precision)

    optimizer = build_optimizer(model, args)
    if opt_state is not None:
        setup.load_optimizer_state(train_model, optimizer, opt_state["optimizer"])  # parallel
        torch.set_rng_state(opt_state["rng"])

    train_tokens = token_file(
        args.data, tokenizer, "train", cache_dir=args.cache_dir, val_fraction=args.val_fraction
    )
    val_tokens = token_file(
        args.data, tokenizer, "val", cache_dir=args.cache_dir, val_fraction=args.val_fraction
    )
    mix = None
    if args.retrieval_mix > 0:
        from longctx.data.synthetic import mix_retrieval as mix

    metrics_path = out / "metrics.jsonl"
    if setup.is_main:  # parallel: one writer
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")
        if not args.resume and metrics_path.exists():
            metrics_path.unlink()
    history: list[dict[str, Any]] = []
    exporter = export_model or (lambda m: m)

    def save() -> None:
        # parallel: gather the whole model and optimizer state (collective), rank 0 writes
        full, opt = setup.gather_model(train_model), setup.optimizer_state(train_model, optimizer)
        if setup.is_main:
            save_checkpoint(
                out,
                exporter(full),
                tokenizer,
                trainer_state={**state, "seq_len": curriculum.at(max(0, state["step"] - 1)).seq_len},
                optimizer_state={"optimizer": opt, "rng": torch.get_rng_state()},
            )
        setup.barrier()

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        if setup.is_main:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    n_params = model.num_parameters()
    n_train = model.num_parameters(trainable_only=True)
    if not args.quiet:
        print(
            f"model: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trainable), "
            f"position={config.position} {config.rope_type if config.position == 'rope' else ''}, "
            f"device={device}, tokens/step={curriculum.tokens_per_step * args.grad_accum}"
        )
    stage = curriculum.at(state["step"])
    if not args.quiet and state["step"] < args.steps:
        print(f"curriculum: seq_len={stage.seq_len} batch={stage.batch_size} from step {state['step']}")
    bar = tqdm(
        total=args.steps,
        initial=state["step"],
        desc="train",
        unit="step",
        disable=True if args.quiet else None,
        dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    steps_done = 0
    stopped_early = False
    val_loss = None
    while state["step"] < args.steps:
        step = state["step"]
        new_stage = curriculum.at(step)
        if new_stage != stage:
            stage = new_stage
            msg = f"curriculum: step {step}: seq_len -> {stage.seq_len}, batch -> {stage.batch_size}"
            if not args.quiet:
                tqdm.write(msg)
            log(
                {
                    "step": step,
                    "event": "seq_len_change",
                    "seq_len": stage.seq_len,
                    "batch_size": stage.batch_size,
                }
            )
        lr = lr_at(step, lr=args.lr, warmup=args.warmup, total=args.steps, min_ratio=args.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = 0.0
        for micro in range(args.grad_accum):
            index = setup.batch_index(step, micro, args.grad_accum)  # parallel: dp ranks draw different ones
            batch = sample_batch(
                train_tokens,
                stage.seq_len,
                stage.batch_size,
                seed=args.seed,
                step=index,
                eos_id=tokenizer.eos_id,
                restart_positions=args.restart_positions,
            )
            if mix is not None:
                batch = mix(batch, tokenizer, args.retrieval_mix, seed=args.seed, step=index)
            if args.objective == "mlm":
                batch = mlm_batch(batch, tokenizer, seed=args.seed, step=index)
            batch = {k: v.to(device) for k, v in batch.items()}
            # parallel: gradients reduced on the last micro-batch only; cp shards the batch, runs ring
            # attention, and reduce_loss gives the group's loss with the exact gradient
            with setup.no_sync(train_model, micro == args.grad_accum - 1):
                with autocast(), setup.context(batch) as local:
                    loss = (
                        setup.reduce_loss(lm_loss(train_model, local, args.loss_chunk_size), local["labels"])
                        / args.grad_accum
                    )
                loss.backward()
            loss_sum += float(loss.detach())
        loss_sum = setup.mean_over_dp(loss_sum)  # parallel
        if not math.isfinite(loss_sum):
            raise ConfigError(
                f"the loss became {loss_sum} at step {step}; lower --lr (now {args.lr}) or raise --warmup"
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], args.grad_clip if args.grad_clip > 0 else 1e9
        )
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tokens = stage.seq_len * stage.batch_size * args.grad_accum * args.dp
        state["step"] = step + 1
        state["tokens_seen"] += tokens
        steps_done += 1
        elapsed = time.perf_counter() - t_start
        eta = elapsed / steps_done * (args.steps - state["step"])
        record = {
            "step": step + 1,
            "loss": round(loss_sum, 5),
            "lr": lr,
            "seq_len": stage.seq_len,
            "batch_size": stage.batch_size,
            "tokens": tokens,
            "tokens_per_s": round(tokens / dt, 1),
            "grad_norm": round(grad_norm, 4),
            "peak_mem_mb": round(peak_memory_bytes(device) / 2**20),
            "eta_s": round(eta, 1),
        }
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", L=stage.seq_len, tok_s=f"{tokens / dt:.0f}")
        last = state["step"] == args.steps
        if args.eval_every and (state["step"] % args.eval_every == 0) or last:
            val_loss = evaluate(
                train_model if setup.enabled else model,
                val_tokens,
                stage.seq_len,
                stage.batch_size,
                args.eval_batches,
                args.seed,
                device,
                args.loss_chunk_size,
                mlm_tokenizer=tokenizer if args.objective == "mlm" else None,
            )
            record["val_loss"] = round(val_loss, 5)
            best = state["best_val_loss"]
            if best is None or val_loss < best - 1e-4:
                state["best_val_loss"], state["bad_evals"] = val_loss, 0
            else:
                state["bad_evals"] += 1
                if args.early_stop_patience and state["bad_evals"] >= args.early_stop_patience:
                    stopped_early = True
        log(record)
        if not args.quiet and (state["step"] % args.log_every == 0 or last or "val_loss" in record):
            tqdm.write(_format(record, args.steps))
        if stopped_early:
            if not args.quiet:
                tqdm.write(
                    f"early stop at step {state['step']}: validation loss did not improve for "
                    f"{args.early_stop_patience} evaluations (best {state['best_val_loss']:.4f})"
                )
            break
        if args.save_every and state["step"] % args.save_every == 0 and not last:
            save()
    bar.close()
    save()
    setup.close()  # parallel: leaves the process group if train() started it
    model.eval()
    return TrainResult(
        model=exporter(model),
        out_dir=out,
        history=history,
        final_val_loss=val_loss,
        stopped_early=stopped_early,
    )


def _format(r: dict[str, Any], total: int) -> str:
    s = (
        f"step {r['step']:>6}/{total} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | L {r['seq_len']} "
        f"| {r['tokens_per_s']:.0f} tok/s | mem {r['peak_mem_mb']} MB | eta {r['eta_s']:.0f}s"
    )
    if "val_loss" in r:
        s += f" | val {r['val_loss']:.4f}"
    return s
