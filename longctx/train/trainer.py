"""The training loop: one `Trainer` for every command that trains (`train`, `extend`, `finetune`, the demo).

What is trained and how is injected, as torchtitan separates them:
    objective     loss(model, batch) -> scalar     next-token / masked-token (`objectives.TokenLoss`), a
                                                   classification head (`longctx.tasks`), ...
    batches       train(step, index) -> batch      a pure function of (step, index): a resumed run sees
                  validation(step) -> [batch]      exactly the batches of an uninterrupted one
    checkpointer  save(...) / restore(model)       a full checkpoint directory (`ModelCheckpoint`) or the
                                                   trainable tensors only (`longctx.tasks`)
    shape         StepShape (resolved)            checkpointing, precision, loss chunk, device
    optim, loop   OptimizerSpec, LoopSpec          schedule, clipping; steps, accumulation, evaluation,
                                                   saving, logging, parallel degrees

`setup` places the model (device, activation checkpointing, compile, DDP/FSDP) and builds the optimizer,
resuming if asked; `step` runs one optimizer step of `grad_accum` micro-batches; `run` loops, evaluates,
logs (one line per interval: step, loss, lr, length, tokens/s, peak memory, ETA, and `metrics.jsonl`) and
saves. Nothing it is given is mutated: the resolved shape and the config to save are values, not edits.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from longctx import parallel
from longctx.checkpoint import load_model, load_state, load_trainer_state, recover, save_checkpoint
from longctx.config import GPTConfig
from longctx.device import peak_memory_bytes
from longctx.errors import CheckpointError, ConfigError
from longctx.model import GPT
from longctx.train.memory import autocast_context, maybe_compile, prepare_for_training
from longctx.train.schedules import lr_at
from longctx.train.spec import LoopSpec, OptimizerSpec, StepShape, build_optimizer


class Objective(Protocol):
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor: ...


class Batches(Protocol):
    def train(self, step: int, index: int) -> dict[str, torch.Tensor]: ...

    def validation(self, step: int) -> list[dict[str, torch.Tensor]]: ...


class Checkpointer(Protocol):
    out: Path

    def save(self, model: nn.Module, trainer_state: dict, optimizer_state: dict) -> None: ...

    def restore(self, model: nn.Module) -> tuple[dict, dict] | None: ...


@dataclass
class TrainResult:
    model: nn.Module
    out_dir: Path
    history: list[dict[str, Any]]
    final_val_loss: float | None
    stopped_early: bool = False


def backbone(model: nn.Module) -> GPT:
    """The GPT inside a task model (`model.backbone`), or the model itself."""
    return getattr(model, "backbone", model)


class ModelCheckpoint:
    """The run directory is a whole longctx checkpoint (config, weights, tokenizer) plus the trainer's and
    optimizer's state, so a training run can be evaluated, served or resumed from the same folder.

    export: what to save of the trained model (e.g. LoRA merged into a copy); config: the config to save
    instead of the model's own (e.g. the longer length a new model was trained at)."""

    def __init__(self, out, tokenizer, *, export=None, config: GPTConfig | None = None, resume: bool = False):
        self.out, self.tokenizer, self.export, self.config = Path(out), tokenizer, export, config
        self.resume = resume

    def restore(self, model: nn.Module) -> tuple[dict, dict] | None:
        # a save killed between its two renames left the last checkpoint at OUT.old: recover it first
        if not (self.resume and (recover(self.out) / "model.safetensors").exists()):
            return None
        ts, opt = load_trainer_state(self.out)
        if ts is None or opt is None:
            raise CheckpointError(
                f"{self.out} has weights but no trainer state: it cannot be resumed "
                "(start a new run with another --out)"
            )
        load_state(model, load_model(self.out).state_dict(), source=str(self.out))
        return ts, opt

    def save(self, model: nn.Module, trainer_state: dict, optimizer_state: dict) -> None:
        save_checkpoint(
            self.out,
            self.export(model) if self.export else model,
            self.tokenizer,
            trainer_state=trainer_state,
            optimizer_state=optimizer_state,
            config=self.config,
        )


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        batches: Batches,
        shape: StepShape,
        optim: OptimizerSpec,
        loop: LoopSpec,
        checkpointer: Checkpointer,
    ):
        optim.validate()
        loop.validate()
        if shape.checkpointing == "auto":
            raise ConfigError("resolve --checkpointing auto before training (longctx.train.resolve_shape)")
        self.model, self.objective, self.batches = model, objective, batches
        self.shape, self.optim, self.loop, self.checkpointer = shape, optim, loop, checkpointer
        self.state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "best_val_loss": None, "bad_evals": 0}
        self.history: list[dict[str, Any]] = []
        self._last_shape: tuple[int, int] | None = None

    # -- setup -----------------------------------------------------------------------------------------
    def setup(self) -> Trainer:
        loop = self.loop
        self.parallel = parallel.init(loop.dp, loop.cp, loop.device)
        self.device = self.parallel.device
        if loop.compile and self.parallel.enabled:
            raise ConfigError("--compile is not supported together with --dp/--cp yet; drop one of them")
        self.quiet = loop.quiet or not self.parallel.is_main  # rank 0 prints and writes the run directory
        restored = self.checkpointer.restore(self.model)
        if restored is not None:
            self.state.update(restored[0])
            if not self.quiet:
                print(f"resuming {self.checkpointer.out} at step {self.state['step']}")
        self.model.to(self.device).train()
        gpt = backbone(self.model)
        prepare_for_training(gpt, self.shape)
        maybe_compile(gpt, loop.compile)
        self.train_model = (
            self.parallel.wrap_model(self.model, loop.dp_mode) if self.parallel.enabled else self.model
        )
        self.optimizer = build_optimizer(self.model.parameters(), self.optim)
        if restored is not None:
            self.parallel.load_optimizer_state(self.train_model, self.optimizer, restored[1]["optimizer"])
            torch.set_rng_state(restored[1]["rng"])
        self.metrics = self.checkpointer.out / "metrics.jsonl"
        if self.parallel.is_main:
            self.checkpointer.out.mkdir(parents=True, exist_ok=True)
            if restored is None and self.metrics.exists():
                self.metrics.unlink()
        return self

    # -- one step --------------------------------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        """One optimizer step: grad_accum micro-batches, clipping, the update. Returns its record."""
        step, loop, setup = self.state["step"], self.loop, self.parallel
        lr = lr_at(
            step,
            lr=self.optim.lr,
            warmup=self.optim.warmup,
            total=loop.steps,
            min_ratio=self.optim.min_lr_ratio,
        )
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0, loss_sum, tokens = time.perf_counter(), 0.0, 0
        for micro in range(loop.grad_accum):
            index = setup.batch_index(step, micro, loop.grad_accum)  # dp ranks draw different ones
            batch = _to(self.batches.train(step, index), self.device)
            tokens += batch["input_ids"].numel()
            if micro == 0:
                self._note_shape(step, batch["input_ids"].shape)
            # parallel: gradients reduced on the last micro-batch only; cp shards the batch, runs ring
            # attention, and reduce_loss gives the group's loss with the exact gradient
            with setup.no_sync(self.train_model, micro == loop.grad_accum - 1):
                with autocast_context(self.device, self.shape.precision), setup.context(batch) as local:
                    loss = self.objective.loss(self.train_model, local)
                    loss = setup.reduce_loss(loss, local["labels"]) / loop.grad_accum
                loss.backward()
            loss_sum += float(loss.detach())
        loss_sum = setup.mean_over_dp(loss_sum)
        if not math.isfinite(loss_sum):
            raise ConfigError(
                f"the loss became {loss_sum} at step {step}; lower --lr (now {self.optim.lr}) or raise --warmup"
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad],
            self.optim.grad_clip if self.optim.grad_clip > 0 else 1e9,
        )
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tokens *= loop.dp
        self.state["step"] = step + 1
        self.state["tokens_seen"] += tokens
        T, B = self._last_shape
        return {
            "step": step + 1,
            "loss": round(loss_sum, 5),
            "lr": lr,
            "seq_len": T,
            "batch_size": B,
            "tokens": tokens,
            "tokens_per_s": round(tokens / dt, 1),
            "grad_norm": round(grad_norm, 4),
            "peak_mem_mb": round(peak_memory_bytes(self.device) / 2**20),
        }

    def _note_shape(self, step: int, ids_shape: torch.Size) -> None:
        """A context-length curriculum (a batch source with `stage(step) -> (seq_len, batch)`) announces its
        stages in the log and metrics; batches of varying padded length (a task's examples) do not."""
        B, T = ids_shape
        stage = getattr(self.batches, "stage", None)
        if stage is not None:
            T, B = stage(step)
            if self._last_shape is None and not self.quiet:
                print(f"curriculum: seq_len={T} batch={B} from step {step}")
            elif self._last_shape is not None and self._last_shape != (T, B):
                if not self.quiet:
                    tqdm.write(f"curriculum: step {step}: seq_len -> {T}, batch -> {B}")
                self._log({"step": step, "event": "seq_len_change", "seq_len": T, "batch_size": B})
        self._last_shape = (T, B)

    # -- evaluation, saving, logging -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the fixed validation batches (None when there are none)."""
        batches = self.batches.validation(max(0, self.state["step"] - 1))
        if not batches:
            return None
        model = self.train_model if self.parallel.enabled else self.model
        self.model.eval()
        with autocast_context(self.device, self.shape.precision):
            losses = [float(self.objective.loss(model, _to(b, self.device))) for b in batches]
        self.model.train()
        return sum(losses) / len(losses)

    def save(self) -> None:
        # parallel: gather the whole model and optimizer state (collective), rank 0 writes
        setup = self.parallel
        full, opt = (
            setup.gather_model(self.train_model),
            setup.optimizer_state(self.train_model, self.optimizer),
        )
        if setup.is_main:
            seq_len = self._last_shape[0] if self._last_shape else self.shape.seq_len
            self.checkpointer.save(
                full,
                trainer_state={**self.state, "seq_len": seq_len},
                optimizer_state={"optimizer": opt, "rng": torch.get_rng_state()},
            )
        setup.barrier()

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.parallel.is_main:
            with open(self.metrics, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _after_eval(self, val_loss: float) -> bool:
        """Track the best validation loss; True when patience has run out (early stop)."""
        best = self.state["best_val_loss"]
        if best is None or val_loss < best - 1e-4:
            self.state["best_val_loss"], self.state["bad_evals"] = val_loss, 0
            return False
        self.state["bad_evals"] += 1
        return (
            bool(self.loop.early_stop_patience) and self.state["bad_evals"] >= self.loop.early_stop_patience
        )

    def describe(self) -> str:
        gpt, loop = backbone(self.model), self.loop
        n, n_train = gpt.num_parameters(), sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        c = gpt.config
        pos = f"{c.position} {c.rope_type if c.position == 'rope' else ''}".strip()
        return (
            f"model: {n / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trainable), position={pos}, "
            f"device={self.device}, precision={self.shape.precision}"
            f"{f' ({self.shape.precision_reason})' if self.shape.precision_reason else ''}, "
            f"checkpointing={self.shape.checkpointing}, "
            f"tokens/step={self.shape.tokens * loop.grad_accum * loop.dp} "
            f"(batch {self.shape.batch} x {self.shape.seq_len} tokens x {loop.grad_accum} accumulated x {loop.dp} dp)"
        )

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        if not hasattr(self, "optimizer"):
            self.setup()
        loop = self.loop
        if not self.quiet:
            print(self.describe())
        bar = tqdm(total=loop.steps, initial=self.state["step"], desc="train", unit="step",
                   disable=True if self.quiet else None, dynamic_ncols=True)  # fmt: skip
        t_start, done, val_loss, stopped = time.perf_counter(), 0, None, False
        while self.state["step"] < loop.steps:
            record = self.step()
            done += 1
            record["eta_s"] = round(
                (time.perf_counter() - t_start) / done * (loop.steps - self.state["step"]), 1
            )
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", L=record["seq_len"], tok_s=f"{record['tokens_per_s']:.0f}"
            )
            last = self.state["step"] == loop.steps
            if (loop.eval_every and self.state["step"] % loop.eval_every == 0) or last:
                val_loss = self.evaluate()
                if val_loss is not None:
                    record["val_loss"] = round(val_loss, 5)
                    stopped = self._after_eval(val_loss)
            self._log(record)
            if not self.quiet and (self.state["step"] % loop.log_every == 0 or last or "val_loss" in record):
                tqdm.write(format_record(record, loop.steps))
            if stopped:
                if not self.quiet:
                    tqdm.write(
                        f"early stop at step {self.state['step']}: validation loss did not improve for "
                        f"{loop.early_stop_patience} evaluations (best {self.state['best_val_loss']:.4f})"
                    )
                break
            if loop.save_every and self.state["step"] % loop.save_every == 0 and not last:
                self.save()
        bar.close()
        self.save()
        self.parallel.close()  # leaves the process group if init() started it
        self.model.eval()
        return TrainResult(self.model, self.checkpointer.out, self.history, val_loss, stopped)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def format_record(r: dict[str, Any], total: int) -> str:
    s = (
        f"step {r['step']:>6}/{total} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | L {r['seq_len']} "
        f"| {r['tokens_per_s']:.0f} tok/s | mem {r['peak_mem_mb']} MB | eta {r['eta_s']:.0f}s"
    )
    if "val_loss" in r:
        s += f" | val {r['val_loss']:.4f}"
    return s
