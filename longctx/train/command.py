"""`longctx train`: options mirror TrainArgs and the specs it embeds (`OptimizerSpec`, `LoopSpec`), by their
flat names; a JSON config file (`--config`) may set any of them, and options given on the command line win
over the file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from longctx.config import PRESETS, GPTConfig
from longctx.errors import ConfigError
from longctx.train.options import add_options, read_config_file, values_from
from longctx.train.pretrain import TrainArgs, train

# option -> help for the options only `train` has; the type and default come from TrainArgs
HELP = {
    "preset": f"model preset: {', '.join(PRESETS)}",
    "data": "text source: file, folder, glob, .jsonl, .parquet, or 'stdlib' (default: the embedded corpus)",
    "tokenizer": "'byte' (default) or a tokenizer.json / checkpoint directory",
    "seq_len": "training sequence length, or 'auto' with --memory",
    "seq_len_schedule": "context-length curriculum, LEN:STEP pairs, e.g. 128:0,256:1000,512:2000 "
    "(tokens per step stay batch-size x seq-len)",
    "batch_size": "sequences per micro-batch at --seq-len (a curriculum keeps batch x length constant); "
    "tokens per step = batch x length x --grad-accum, printed on the first line",
    "restart_positions": "positions restart at 0 at each document in a packed row",
    "retrieval_mix": "share of rows replaced by synthetic passkey retrieval samples (0..1)",
    "objective": "clm (next-token, the decoder) or mlm (masked tokens 15%% with 80/10/10, BERT-style; "
    "trains the bidirectional encoder: sets causal=false on a new model)",
    "cache_dir": "where tokenized corpora are cached (default ~/.cache/longctx)",
    "val_fraction": "share of documents held out for validation",
}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help='JSON file whose keys mirror these options (e.g. {"steps": 500})')
    add_options(p, TrainArgs, HELP, skip=("config_overrides",))
    g = p.add_argument_group("model (override the preset)")
    g.add_argument("--position", help="rope, alibi, learned, sinusoidal or none")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any GPTConfig field, e.g. --set n_layer=4 --set rope_theta=500000 (repeatable)",
    )


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
    base = read_config_file(ns.config, TrainArgs) if ns.config else {}
    for source in (base, vars(ns)):  # --seq-len auto: planned from --memory (seq_len 0)
        if source.get("seq_len") == "auto":
            source["seq_len"] = 0
    values = values_from(ns, TrainArgs, base)
    overrides = dict(values.pop("config_overrides", {}) or {})
    if getattr(ns, "position", None):
        overrides["position"] = ns.position
    overrides.update(_parse_overrides(getattr(ns, "set", []) or []))
    return TrainArgs.from_flat(**values, config_overrides=overrides)


def run(ns: argparse.Namespace) -> int:
    args = args_from_namespace(ns)
    result = train(args)
    if int(os.environ.get("RANK", "0")) > 0:  # parallel: rank 0 reports
        return 0
    print(
        f"checkpoint: {result.out_dir}"
        + (f"  (val loss {result.final_val_loss:.4f})" if result.final_val_loss is not None else "")
    )
    return 0
