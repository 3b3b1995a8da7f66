"""`longctx train`: options mirror TrainArgs; a JSON config file (`--config`) may set any of them, and
options given on the command line win over the file."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from longctx.config import PRESETS, GPTConfig
from longctx.errors import ConfigError
from longctx.train.trainer import TrainArgs, train

# option -> help; the type and default come from TrainArgs
HELP = {
    "preset": f"model preset: {', '.join(PRESETS)}",
    "data": "text source: file, folder, glob, .jsonl, .parquet, or 'stdlib' (default: the embedded corpus)",
    "tokenizer": "'byte' (default) or a tokenizer.json / checkpoint directory",
    "seq_len": "training sequence length, or 'auto' with --memory",
    "seq_len_schedule": "context-length curriculum, LEN:STEP pairs, e.g. 128:0,256:1000,512:2000 "
    "(tokens per step stay batch-size x seq-len)",
    "memory": "memory budget for --seq-len auto, e.g. 20GiB",
    "steps": "optimizer steps",
    "batch_size": "sequences per micro-batch (at --seq-len)",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "min_lr_ratio": "final LR as a fraction of the peak (cosine)",
    "warmup": "linear warmup steps",
    "weight_decay": "decoupled weight decay on matrices (AdamW)",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "optimizer": "adamw, adam or sgd",
    "momentum": "SGD momentum",
    "seed": "seed for weights, batches and dropout",
    "device": "auto, cpu, cuda, cuda:N",
    "out": "run directory (checkpoint, metrics.jsonl)",
    "resume": "continue the run in --out from its last checkpoint",
    "eval_every": "validate every N steps (0: at the end only)",
    "eval_batches": "validation batches per evaluation",
    "early_stop_patience": "stop after N evaluations without improvement (0: never)",
    "save_every": "checkpoint every N steps (0: at the end only)",
    "log_every": "a log line every N steps",
    "restart_positions": "positions restart at 0 at each document in a packed row",
    "retrieval_mix": "share of rows replaced by synthetic passkey retrieval samples (0..1)",
    "objective": "clm (next-token, the decoder) or mlm (masked tokens 15%% with 80/10/10, BERT-style; "
    "trains the bidirectional encoder: sets causal=false on a new model)",
    "loss_chunk_size": "tokens per chunk of the chunked cross-entropy",
    "checkpointing": "activation checkpointing: none, all, every:K, or auto (the fastest that fits --memory)",
    "precision": "fp32 or bf16 (autocast)",
    "compile": "torch.compile the model",
    "cache_dir": "where tokenized corpora are cached (default ~/.cache/longctx)",
    "val_fraction": "share of documents held out for validation",
    "quiet": "no progress output",
    "dp": "data-parallel ranks (launch with torchrun --nproc-per-node DP*CP); each draws different batches",
    "cp": "context-parallel ranks: each sequence split over CP ranks, ring attention (seq len a multiple of 2*CP)",
    "dp_mode": "ddp (replicated model) or fsdp (FSDP2: parameters, gradients, optimizer state sharded)",
}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help='JSON file whose keys mirror these options (e.g. {"steps": 500})')
    for f in dataclasses.fields(TrainArgs):
        if f.name == "config_overrides":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", default=None, help=HELP.get(f.name))
        else:
            p.add_argument(flag, default=None, help=HELP.get(f.name), metavar=f.name.upper())
    g = p.add_argument_group("model (override the preset)")
    g.add_argument("--position", help="rope, alibi, learned, sinusoidal or none")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any GPTConfig field, e.g. --set n_layer=4 --set rope_theta=500000 (repeatable)",
    )


def _coerce(name: str, value: Any) -> Any:
    field = {f.name: f for f in dataclasses.fields(TrainArgs)}[name]
    t = str(field.type)
    if value is None:
        return None
    try:
        if name == "seq_len" and str(value) == "auto":
            return 0
        if t.startswith("int"):
            return int(value)
        if t.startswith("float"):
            return float(value)
        if t.startswith("bool"):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')} expects a number, got {value!r}") from None
    return value


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        if k not in known:
            raise ConfigError(f"--set {k}: not a GPTConfig field; fields: {', '.join(sorted(known))}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def args_from_namespace(ns: argparse.Namespace) -> TrainArgs:
    values: dict[str, Any] = {}
    if ns.config:
        path = Path(ns.config)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            file_values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON ({e})") from None
        names = {f.name for f in dataclasses.fields(TrainArgs)}
        unknown = sorted(set(file_values) - names)
        if unknown:
            raise ConfigError(f"config file {path} has unknown keys {unknown}")
        values.update(file_values)
    for f in dataclasses.fields(TrainArgs):
        v = getattr(ns, f.name, None)
        if v is not None:
            values[f.name] = v
    values = {k: (_coerce(k, v) if k != "config_overrides" else v) for k, v in values.items()}
    overrides = dict(values.pop("config_overrides", {}) or {})
    if getattr(ns, "position", None):
        overrides["position"] = ns.position
    overrides.update(_parse_overrides(getattr(ns, "set", []) or []))
    args = TrainArgs(**values, config_overrides=overrides)
    return args


def run(ns: argparse.Namespace) -> int:
    args = args_from_namespace(ns)
    result = train(args)
    if args.quiet and (args.dp > 1 or args.cp > 1):  # parallel: rank 0 reports (train() set the others quiet)
        return 0
    print(
        f"checkpoint: {result.out_dir}"
        + (f"  (val loss {result.final_val_loss:.4f})" if result.final_val_loss is not None else "")
    )
    return 0
