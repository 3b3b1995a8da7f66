"""Fine-tuning on a task: `finetune(args)` trains, evaluates and saves; `sweep(args, lengths)` repeats it at
several `--max-len` and reports how the score moves with context length.

- classify: `ClassificationModel` (last-token or mean pooling) trained with cross-entropy on `label`;
  scored by accuracy and macro-F1.
- generate: supervised fine-tuning on prompt + completion with the loss on the completion tokens only (the
  trainer's chunked `lm_loss`, labels IGNORE_INDEX on the prompt); scored by greedy generation with the
  evaluation suite's BLEU / ROUGE / exact match (`longctx.eval.genmetrics`).

Training is the one `Trainer` of `longctx.train` with the task injected as the objective and its examples
as the batch source (a pure function of (seed, step), as for language-model training), so a fine-tune has
the same progress line, gradient accumulation, activation checkpointing, precision, --dp and resume
(`--resume`: the trainable tensors and the optimizer are saved in `train_state/` every --save-every steps).
Output directory:

    finetune.json        what was trained: task, base checkpoint, PEFT spec, labels, max_len, truncation
    adapter.safetensors  the PEFT method's own tensors (lora / adapter / prefix)
    head.safetensors     the classification head (classify)
    merged/              a full longctx checkpoint: LoRA folded into the weights, or the fully fine-tuned
                         model (--peft none); adapter and prefix cannot be merged
    results.json         metrics on the eval file (or the training file when there is none)
    metrics.jsonl        one line per training step
    train_state/         the trainable tensors, trainer and optimizer state (for --resume)
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from longctx.checkpoint import (
    load_model,
    load_tokenizer,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from longctx.data.sources import read_jsonl
from longctx.data.tokenizer import Tokenizer
from longctx.device import resolve_device, resolve_precision
from longctx.errors import CheckpointError, ConfigError
from longctx.model import GPT
from longctx.peft import PeftSpec, apply_peft, count_parameters, load_peft_state, merge_peft, peft_state_dict
from longctx.tasks import data as D
from longctx.tasks.heads import ClassificationModel
from longctx.train.loss import LossBuffers, lm_loss
from longctx.train.pretrain import resolve_shape
from longctx.train.spec import LoopSpec, OptimizerSpec, StepShape, embedded, from_flat
from longctx.train.trainer import Trainer

TASKS = ("classify", "generate")
META, ADAPTER, HEAD, MERGED, RESULTS, STATE = (
    "finetune.json",
    "adapter.safetensors",
    "head.safetensors",
    "merged",
    "results.json",
    "train_state",
)
# the learning rate when none is given, per PEFT method. A prefix is a few hundred numbers per layer that
# must move far from their small start before the softmax notices them: 60 steps of the separable toy task
# ("alpha ..." vs "omega ...", a `tiny` model trained 20-100 steps) end at loss 0.64-0.66 with 1e-3 (chance
# is 0.69: nothing learned), 0.23-0.33 with 1e-2 and 0.003-0.10 with 3e-2; LoRA reaches 0.002 with 1e-3
# (tests/tasks/test_tasks_classify.py::test_prefix_tuning_learns_a_separable_task)
DEFAULT_LR = {"lora": 1e-3, "adapter": 1e-3, "prefix": 3e-2, "none": 1e-3}


@dataclass
class FinetuneArgs:
    ckpt: str = ""
    task: str = "classify"
    data: str = ""
    eval: str | None = None
    peft: PeftSpec = field(default_factory=PeftSpec)
    max_len: int | None = None  # None: the model's context length
    truncate: str = "middle"
    batch_size: int = 8
    max_new_tokens: int = 32  # generate: tokens generated per eval prompt
    eval_batch_size: int = 16
    optim: OptimizerSpec = embedded(
        lambda: OptimizerSpec(lr=None, warmup=10, weight_decay=0.0), OptimizerSpec
    )
    loop: LoopSpec = embedded(lambda: LoopSpec(steps=100, out="runs/finetune"), LoopSpec)

    @classmethod
    def from_flat(cls, **values: Any) -> FinetuneArgs:
        return from_flat(cls, values)

    @property
    def out(self) -> str:
        return self.loop.out

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.task in TASKS, f"unknown --task {self.task!r}; choose one of {', '.join(TASKS)}")
        need(bool(self.data), "--data is required: a .jsonl file of training records")
        need(
            self.truncate in D.TRUNCATIONS,
            f"unknown --truncate {self.truncate!r}; choose one of {', '.join(D.TRUNCATIONS)}",
        )
        need(self.max_len is None or self.max_len > 0, f"--max-len must be positive, got {self.max_len}")
        need(self.batch_size > 0 and self.eval_batch_size > 0, "--batch-size must be positive")
        need(self.max_new_tokens > 0, "--max-new-tokens must be positive")
        self.loop.validate()
        self.peft.validate()


@dataclass
class FinetuneResult:
    model: nn.Module  # GPT (generate) or ClassificationModel (classify), PEFT wrappers in place
    out_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    trainable_parameters: int
    total_parameters: int


# -- metrics ---------------------------------------------------------------------------------------------


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN) over the classes that occur in either
    sequence (scikit-learn's `f1_score(average="macro")` with its default label set)."""
    classes = sorted(set(y_true) | set(y_pred))
    scores = []
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


# -- the two tasks ---------------------------------------------------------------------------------------


class ClassifyTask:
    def __init__(
        self,
        gpt: GPT,
        tokenizer: Tokenizer,
        args: FinetuneArgs,
        max_len: int,
        labels: D.LabelMap | None = None,
    ):
        train = read_jsonl(args.data, {"text": (str,), "label": (str, int)})
        self.labels = labels or D.LabelMap([r["label"] for r in train])
        self.pad_id = tokenizer.pad_id
        self.train = D.classify_examples(train, tokenizer, self.labels, max_len, args.truncate, args.data)
        ev = read_jsonl(args.eval, {"text": (str,), "label": (str, int)}) if args.eval else None
        self.eval = (
            D.classify_examples(ev, tokenizer, self.labels, max_len, args.truncate, args.eval)
            if ev
            else self.train
        )
        self.model = ClassificationModel(gpt, len(self.labels))

    def batch(self, idx) -> dict[str, torch.Tensor]:
        return D.collate_classify([self.train[i] for i in idx], self.pad_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch["input_ids"], batch["lengths"]), batch["labels"])

    @torch.no_grad()
    def evaluate(self, device: torch.device, args: FinetuneArgs) -> dict[str, Any]:
        self.model.eval()
        preds: list[int] = []
        for s in tqdm(range(0, len(self.eval), args.eval_batch_size), desc="eval", disable=args.loop.quiet):
            b = D.collate_classify(self.eval[s : s + args.eval_batch_size], self.pad_id)
            preds += self.model(b["input_ids"].to(device), b["lengths"].to(device)).argmax(-1).tolist()
        gold = [e.label for e in self.eval]
        return {
            "accuracy": sum(p == g for p, g in zip(preds, gold)) / len(gold),
            "macro_f1": macro_f1(gold, preds),
            "examples": len(gold),
            "truncated_share": sum(e.cut for e in self.eval) / len(self.eval),
        }

    def save(self, out: Path) -> dict[str, Any]:
        head = {k: v.detach().cpu().contiguous() for k, v in self.model.head.state_dict().items()}
        save_file(head, str(out / HEAD), metadata={"format": "pt", "producer": "longctx finetune"})
        return {"labels": self.labels.to_list(), "pooling": self.model.pooling}


class GenerateTask:
    def __init__(self, gpt: GPT, tokenizer: Tokenizer, args: FinetuneArgs, max_len: int):
        if not gpt.config.causal:
            raise ConfigError(
                "--task generate needs a causal decoder; this checkpoint is a bidirectional "
                "encoder (causal=false): fine-tune it with --task classify"
            )
        if args.max_new_tokens >= max_len:
            raise ConfigError(
                f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt in --max-len {max_len}"
            )
        fields = {"prompt": (str,), "completion": (str,)}
        self.tokenizer, self.max_len, self.model, self.chunk = (
            tokenizer,
            max_len,
            gpt,
            args.loop.loss_chunk_size,
        )
        self.buffers = LossBuffers()  # the loss's scratch, kept from step to step
        self.train = D.generate_examples(
            read_jsonl(args.data, fields), tokenizer, max_len, args.truncate, args.data
        )
        self.eval = (
            D.generate_examples(read_jsonl(args.eval, fields), tokenizer, max_len, args.truncate, args.eval)
            if args.eval
            else self.train
        )

    def batch(self, idx) -> dict[str, torch.Tensor]:
        return D.collate_generate([self.train[i] for i in idx], self.tokenizer.pad_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss(model, batch, self.chunk, self.buffers)

    @torch.no_grad()
    def evaluate(self, device: torch.device, args: FinetuneArgs) -> dict[str, Any]:
        from longctx.eval.genmetrics import METRIC_NAMES, score
        from longctx.eval.prompting import GreedyAnswers

        self.model.eval()
        answer = GreedyAnswers(self.model, self.tokenizer)  # the weights change between passes: a new one
        budget = self.max_len - args.max_new_tokens  # as LongBench: the prompt leaves room for the answer
        preds, cut = [], 0
        for e in tqdm(self.eval, desc="generate", disable=args.loop.quiet):
            prompt = D.truncate(e.prompt_full, budget, args.truncate)
            cut += len(e.prompt_full) > budget
            preds.append(answer(prompt, args.max_new_tokens).strip())
        metrics = score(preds, [e.reference for e in self.eval], METRIC_NAMES)
        return {
            **metrics,
            "examples": len(preds),
            "truncated_share": cut / len(preds),
            "samples": [{"output": p, "reference": e.reference} for p, e in zip(preds[:5], self.eval)],
        }

    def save(self, out: Path) -> dict[str, Any]:
        return {}


# -- training --------------------------------------------------------------------------------------------


def resolve_max_len(gpt: GPT, max_len: int | None) -> int:
    c = gpt.config
    if max_len is None:
        return c.context_length
    if c.position == "learned" and max_len > c.max_seq_len:
        raise ConfigError(
            f"--max-len {max_len} exceeds the learned position table ({c.max_seq_len}); "
            "use a shorter --max-len or a model with rope/alibi positions"
        )
    return max_len


class ExampleBatches:
    """The trainer's batch source for a task: a random draw of examples, a pure function of (seed, index)."""

    def __init__(self, task: ClassifyTask | GenerateTask, batch_size: int, seed: int):
        self.task, self.batch_size, self.seed = task, batch_size, seed

    def train(self, step: int, index: int) -> dict[str, torch.Tensor]:
        return self.task.batch(
            D.batch_indices(len(self.task.train), self.batch_size, seed=self.seed, step=index)
        )

    def validation(self, step: int) -> list[dict[str, torch.Tensor]]:
        return []  # a task is scored by its metrics once training ends


class TrainableCheckpoint:
    """What a fine-tune needs to resume: the trainable tensors (adapter or prefix, head), the trainer's and
    the optimizer's state, in OUT/train_state; the base model stays where it was."""

    def __init__(self, out: Path, resume: bool):
        self.out, self.resume = out, resume

    def restore(self, model: nn.Module) -> tuple[dict, dict] | None:
        state = load_training_state(self.out / STATE) if self.resume else None
        if state is None:
            return None
        tensors, ts, opt = state
        params = dict(model.named_parameters())
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise CheckpointError(f"{self.out / STATE} does not match this fine-tune ({unknown[:3]})")
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t)
        return ts, opt

    def save(self, model: nn.Module, trainer_state: dict, optimizer_state: dict) -> None:
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        save_training_state(self.out / STATE, trainable, trainer_state, optimizer_state)


def finetune(args: FinetuneArgs) -> FinetuneResult:
    """Load `args.ckpt`, wrap it for `args.peft`, train `args.loop.steps` steps, evaluate, save to `args.out`."""
    args.validate()
    loop = args.loop
    torch.manual_seed(loop.seed)
    out = Path(loop.out)
    gpt = load_model(args.ckpt)
    tokenizer = load_tokenizer(args.ckpt)
    max_len = resolve_max_len(gpt, args.max_len)
    apply_peft(gpt, args.peft)
    task: ClassifyTask | GenerateTask = (ClassifyTask if args.task == "classify" else GenerateTask)(
        gpt, tokenizer, args, max_len
    )
    if loop.cp > 1 and args.task == "classify":
        raise ConfigError("--cp splits sequences for token-level losses; a classification head needs --cp 1")
    n_train, n_total = count_parameters(task.model)
    if not loop.quiet:
        beyond = " (beyond the model's trained context)" if max_len > gpt.config.context_length else ""
        print(
            f"{args.task} | peft={args.peft.method} | max_len={max_len}{beyond} truncate={args.truncate} "
            f"| {len(task.train)} train / {len(task.eval)} eval examples"
        )
        print(f"trainable parameters: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.2f}%)")
    optim = args.optim
    if optim.lr is None:
        optim = dataclasses.replace(optim, lr=DEFAULT_LR[args.peft.method])
    device = resolve_device(loop.device)
    precision, why = resolve_precision(loop.precision, device)
    shape = resolve_shape(
        StepShape(gpt.config, max_len, args.batch_size, "none", precision, optim.optimizer,
                  loop.loss_chunk_size, device.type, precision_reason=why),
        auto_length=False, checkpointing=loop.checkpointing, memory=loop.memory,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer = Trainer(
        task.model, task, ExampleBatches(task, args.batch_size, loop.seed), shape, optim, loop,
        TrainableCheckpoint(out, loop.resume),
    )  # fmt: skip
    history = trainer.run().history
    if not trainer.parallel.is_main:
        return FinetuneResult(task.model, out, {}, history, n_train, n_total)
    metrics = task.evaluate(trainer.device, args)
    meta = {
        "task": args.task,
        "base": str(Path(args.ckpt).resolve()),
        "peft": args.peft.to_dict(),
        "max_len": max_len,
        "truncate": args.truncate,
        **task.save(out),
    }
    _save_weights(out, gpt, tokenizer, args.peft, meta)
    losses = [h["loss"] for h in history if "loss" in h]
    results = {
        "task": args.task,
        "max_len": max_len,
        "truncate": args.truncate,
        "peft": args.peft.method,
        "lr": optim.lr,
        "eval_split": "eval" if args.eval else "train (no --eval file)",
        "metrics": metrics,
        "trainable_parameters": n_train,
        "total_parameters": n_total,
        "final_loss": losses[-1] if losses else None,
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    return FinetuneResult(task.model, out, metrics, history, n_train, n_total)


def _save_weights(out: Path, gpt: GPT, tokenizer: Tokenizer, spec: PeftSpec, meta: dict[str, Any]) -> None:
    if spec.method != "none":
        save_file(
            peft_state_dict(gpt),
            str(out / ADAPTER),
            metadata={"format": "pt", "producer": "longctx finetune", "method": spec.method},
        )
    if spec.mergeable:
        save_checkpoint(out / MERGED, merge_peft(gpt, spec), tokenizer)
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")


def load_finetuned(path: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, dict]:
    """A fine-tuned model back from its directory: (GPT or ClassificationModel, finetune.json)."""
    path = Path(path)
    if not (path / META).exists():
        raise CheckpointError(f"{path} has no {META}; is it a `longctx finetune` output directory?")
    meta = json.loads((path / META).read_text())
    spec = PeftSpec.from_dict(meta["peft"])
    if spec.method == "none":
        gpt = load_model(path / MERGED)
    else:
        gpt = apply_peft(load_model(meta["base"]), spec)
        load_peft_state(gpt, load_file(str(path / ADAPTER)), source=str(path / ADAPTER))
    model: nn.Module = gpt
    if meta["task"] == "classify":
        model = ClassificationModel(gpt, len(meta["labels"]), meta["pooling"])
        model.head.load_state_dict(load_file(str(path / HEAD)))
    model.eval()
    return (model.to(device) if device is not None else model), meta


# -- the context-length sweep ----------------------------------------------------------------------------


def primary_metrics(task: str) -> tuple[str, ...]:
    return ("accuracy", "macro_f1") if task == "classify" else ("exact_match", "rougeL")


def sweep(args: FinetuneArgs, lengths: Sequence[int]) -> dict[str, Any]:
    """Fine-tune and evaluate afresh at each max length (same seed, same data); results.json + sweep.png."""
    if not lengths:
        raise ConfigError("--sweep-len needs at least one length, e.g. 256,1024,4096")
    out = Path(args.loop.out)
    rows = []
    for L in lengths:
        r = finetune(replace(args, max_len=int(L), loop=replace(args.loop, out=str(out / f"len_{L}"))))
        rows.append({"max_len": int(L), **{k: v for k, v in r.metrics.items() if k != "samples"}})
    trained = load_model(args.ckpt).config.context_length
    names = primary_metrics(args.task)
    summary = {
        "task": args.task,
        "peft": args.peft.method,
        "truncate": args.truncate,
        "trained_context": trained,
        "results": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps(summary, indent=2) + "\n")
    from longctx.eval.plots import line_plot

    line_plot(
        {n: ([r["max_len"] for r in rows], [r[n] for r in rows]) for n in names},
        out / "sweep.png",
        xlabel="--max-len (tokens kept per input)",
        ylabel="score",
        title=f"{args.task}: score vs context length ({args.peft.method}, truncate {args.truncate})",
        trained=dict.fromkeys(names, trained),
        ylim=(0.0, 1.02),
    )
    summary["table"] = format_sweep(rows, names)
    return summary


def format_sweep(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    head = f"{'max_len':>8} | " + " | ".join(f"{n:>11}" for n in names) + f" | {'truncated':>9} | change"
    lines = [head, "-" * len(head)]
    first = rows[0][names[0]]
    for r in rows:
        lines.append(
            f"{r['max_len']:>8} | "
            + " | ".join(f"{r[n]:>11.4f}" for n in names)
            + f" | {r['truncated_share']:>9.0%} | {r[names[0]] - first:+.4f}"
        )
    return "\n".join(lines)
