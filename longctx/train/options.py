"""Command-line options made from specs: every field of a spec-holding dataclass (and of the specs it
embeds) becomes `--field-name`, its type and default from the dataclass, its help from `HELP`. `train`,
`extend` and `finetune` share them, so every command that trains has every loop and optimizer option.

An option not given stays None here, so the dataclass's own default applies (`values_from`); a JSON file
(`--config`) may give any of them by the same flat names, and the command line wins over the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from longctx.errors import ConfigError
from longctx.train.spec import flat_fields

HELP = {
    "steps": "optimizer steps",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "min_lr_ratio": "final LR as a fraction of the peak (cosine)",
    "warmup": "linear warmup steps",
    "weight_decay": "decoupled weight decay on matrices (AdamW)",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "optimizer": "adamw, adam or sgd",
    "momentum": "SGD momentum",
    "beta1": "Adam beta1",
    "beta2": "Adam beta2",
    "seed": "seed for weights, batches and dropout",
    "device": "auto, cpu, cuda, cuda:N",
    "out": "run directory (checkpoint, metrics.jsonl)",
    "resume": "continue the run in --out from its last checkpoint",
    "eval_every": "validate every N steps (0: at the end only)",
    "eval_batches": "validation batches per evaluation",
    "early_stop_patience": "stop after N evaluations without improvement (0: never)",
    "save_every": "checkpoint every N steps (0: at the end only)",
    "log_every": "a log line every N steps",
    "loss_chunk_size": "tokens per chunk of the chunked cross-entropy",
    "checkpointing": "activation checkpointing: none, all, every:K, or auto (the fastest that fits --memory)",
    "memory": "memory budget (e.g. 20GiB) for --checkpointing auto and --seq-len auto",
    "precision": "auto (default: bf16 autocast where the CPU/GPU runs bf16 natively, else fp32), fp32, bf16",
    "compile": "torch.compile the model",
    "quiet": "no progress output",
    "dp": "data-parallel ranks (launch with torchrun --nproc-per-node DP*CP); each draws different batches",
    "cp": "context-parallel ranks: each sequence split over CP ranks, ring attention (seq len a multiple of 2*CP)",
    "dp_mode": "ddp (replicated model) or fsdp (FSDP2: parameters, gradients, optimizer state sharded)",
}


def add_options(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, cls, helps: dict[str, str], skip=()
) -> None:
    """`--name` for every flat field of `cls` not in `skip` (booleans are flags)."""
    for name, (_, f) in flat_fields(cls).items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        text = helps.get(name, HELP.get(name))
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", default=None, help=text)
        else:
            p.add_argument(flag, default=None, help=text, metavar=name.upper())


def coerce(cls, name: str, value: Any) -> Any:
    """A flag's or a config file's value as the field's type; a one-line error otherwise."""
    t = str(flat_fields(cls)[name][1].type)
    if value is None:
        return None
    try:
        if t.startswith("bool"):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if t.startswith("int") and not isinstance(value, bool):
            return int(value)
        if t.startswith("float") and not isinstance(value, bool):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name.replace('_', '-')} expects a number, got {value!r}") from None
    return value


def read_config_file(path: str, cls) -> dict[str, Any]:
    """The options a JSON `--config` file sets, checked against `cls`'s flat names."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        values = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {p} must hold a JSON object of options")
    unknown = sorted(set(values) - set(flat_fields(cls)))
    if unknown:
        raise ConfigError(f"config file {p} has unknown keys {unknown}")
    return values


def values_from(ns: argparse.Namespace, cls, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options given on the command line (over `base`, e.g. a config file's), coerced to their types."""
    values = dict(base or {})
    for name in flat_fields(cls):
        v = getattr(ns, name, None)
        if v is not None:
            values[name] = v
    return {k: coerce(cls, k, v) if isinstance(v, (str, int, float, bool)) else v for k, v in values.items()}
