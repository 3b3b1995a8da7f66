"""The checkpoint directory every stage reads and writes.

    config.json             GPTConfig (HF-compatible `rope_scaling` inside)
    model.safetensors       weights (never pickled)
    tokenizer.json          HF tokenizers format (+ tokenizer_config.json)
    trainer_state.json      step, losses, curriculum position, data cursor (training runs only)
    optimizer.pt            optimizer + RNG state, loaded with weights_only=True (training runs only)

Saving is atomic: everything is written to a temporary sibling directory, which then replaces the old one
by renames; a kill at any moment leaves either the old or the new checkpoint whole (`_recover` picks up
the one left aside). A Hugging Face directory (config.json with `architectures`) is accepted wherever a
checkpoint is, through `longctx.interop`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from longctx.config import GPTConfig
from longctx.data.tokenizer import Tokenizer, load_tokenizer
from longctx.errors import CheckpointError, ConfigError
from longctx.model import GPT

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"


def _recover(path: Path) -> Path:
    """If a save was killed between its two renames, the previous checkpoint sits at `<path>.old`."""
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        old.rename(path)
    return path


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def is_hf_directory(path: str | Path) -> bool:
    cfg = Path(path) / CONFIG
    if not cfg.exists():
        return False
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    return d.get("model_type") != "longctx" and ("architectures" in d or "model_type" in d)


def save_checkpoint(
    path: str | Path,
    model: GPT,
    tokenizer: Tokenizer | None = None,
    *,
    trainer_state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.config.save(tmp / CONFIG)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": "longctx"})
    (tokenizer or load_tokenizer(None)).save(tmp)
    if trainer_state is not None:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / OPTIMIZER)
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        # the checkpoint is also the run directory: carry over what the save does not own (metrics, plots,
        # adapters, eval results) by hard links, so nothing is lost and nothing is copied
        for item in path.iterdir():
            if not (tmp / item.name).exists() and ".tmp-" not in item.name:
                if item.is_dir():
                    shutil.copytree(item, tmp / item.name, copy_function=_link_or_copy)
                else:
                    _link_or_copy(item, tmp / item.name)
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)
    return path


def load_config(path: str | Path) -> GPTConfig:
    path = _recover(Path(path))
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_hf_directory(path):
        from longctx.interop import config_from_hf

        return config_from_hf(path)
    return GPTConfig.load(path / CONFIG)


def load_model(
    path: str | Path, device: str | torch.device | None = None, config: GPTConfig | None = None
) -> GPT:
    """Build the model from `path` (ours or HF) and load its weights. `config` overrides the stored one
    (e.g. a new rope_scaling); the weights must still fit it."""
    path = _recover(Path(path))
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_hf_directory(path):
        from longctx.interop import load_hf_model

        return load_hf_model(path, device=device, config=config)
    config = config or load_config(path)
    weights = path / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{path} has no {WEIGHTS}; is it a longctx checkpoint directory?")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt or truncated ({e}); retrain or restore it") from None
    model = GPT(config)
    load_state(model, state, source=str(weights))
    model.eval()
    return model.to(device) if device is not None else model


def load_state(model: GPT, state: dict[str, torch.Tensor], source: str = "weights") -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the config: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}"
        )


def load_trainer_state(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    path = _recover(Path(path))
    ts, opt = None, None
    if (path / TRAINER_STATE).exists():
        try:
            ts = json.loads((path / TRAINER_STATE).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path / TRAINER_STATE} is corrupt ({e})") from None
    if (path / OPTIMIZER).exists():
        try:
            opt = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
            raise CheckpointError(
                f"{path / OPTIMIZER} is corrupt ({type(e).__name__}); "
                "resume from another checkpoint or start fresh"
            ) from None
    return ts, opt


def describe(path: str | Path) -> dict[str, Any]:
    """What `longctx info` prints: config, parameter count, tokenizer, training progress."""
    path = Path(path)
    config = load_config(path)
    try:
        tok = load_tokenizer(path)
        tok_desc = f"{type(tok).__name__} (vocab {tok.vocab_size})"
    except (CheckpointError, ConfigError) as e:
        tok_desc = f"unavailable: {e}"
    with torch.device("meta"):
        n = GPT(config).num_parameters()
    ts, _ = load_trainer_state(path) if not is_hf_directory(path) else (None, None)
    out = {
        "path": str(path),
        "parameters": n,
        "tokenizer": tok_desc,
        "context_length": config.context_length,
        "config": config.to_dict(),
    }
    if ts:
        out["trainer_state"] = {
            k: ts[k] for k in ("step", "seq_len", "best_val_loss", "tokens_seen") if k in ts
        }
    return out
