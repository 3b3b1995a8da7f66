"""Every checkpoint on disk: the one directory every stage reads and writes, and the formats it reads too.

    config.json             GPTConfig (HF-compatible `rope_scaling` inside)
    model.safetensors       weights (never pickled)
    tokenizer.json          HF tokenizers format (+ tokenizer_config.json)
    trainer_state.json      step, losses, curriculum position, data cursor (training runs only)
    optimizer.pt            optimizer + RNG state, loaded with weights_only=True (training runs only)

Saving is atomic: everything is written to a temporary sibling directory, which then replaces the old one
by renames; a kill at any moment leaves either the old or the new checkpoint whole (`recover` picks up
the one left aside).

Other formats are one `CheckpointFormat` record each in `FORMATS` (how to recognise one, read its config,
its tensors shard by shard under our names, its tokenizer): a Hugging Face directory (config.json with
`architectures`) is read here with `longctx.interop.hf` translating names and keys. `load_model`,
`load_config` and `load_tokenizer` accept any registered format, so every command does. This module owns
the file I/O; the adapters in `longctx.interop` only translate.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from longctx.catalogue import GGUF_NAME, MANIFEST, resolve
from longctx.config import GPTConfig
from longctx.data.tokenizer import Tokenizer
from longctx.data.tokenizer import load_tokenizer as load_tokenizer_files
from longctx.errors import CheckpointError, ConfigError
from longctx.interop import gguf, hf
from longctx.model import GPT
from longctx.positions import build_positions

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"


# -- formats ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointFormat:
    """One kind of checkpoint longctx reads. tensors: our parameter names, one dict per file (a shard), so a
    large model never holds two copies of its weights."""

    name: str
    detect: Callable[[Path], bool]
    config: Callable[[Path], GPTConfig]
    tensors: Callable[[Path, GPTConfig], Iterator[dict[str, torch.Tensor]]]
    tokenizer: Callable[[Path], Tokenizer]
    # our name -> shape of every stored tensor, read from the file headers only (`longctx info` checks the
    # weights against the config without loading them)
    shapes: Callable[[Path, GPTConfig], dict[str, tuple[int, ...]]]


FORMATS: list[CheckpointFormat] = []


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    """Add a format (detections must not overlap: the first that says yes reads a path)."""
    FORMATS.append(fmt)
    return fmt


def format_of(path: str | Path) -> CheckpointFormat:
    path = recover(Path(path))
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt
    raise CheckpointError(f"{path} is not a checkpoint longctx reads ({', '.join(f.name for f in FORMATS)})")


def load_config(path: str | Path) -> GPTConfig:
    return format_of(path).config(recover(Path(path)))


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """The tokenizer of a checkpoint of any format; else what `longctx.data.tokenizer.load_tokenizer` reads
    (None or 'byte': the byte tokenizer; a tokenizer.json or a folder holding one)."""
    if path is not None and str(path) != "byte":
        p = recover(Path(path))
        fmt = next((f for f in FORMATS if p.exists() and f.detect(p)), None)
        if fmt is not None:
            return fmt.tokenizer(p)
    return load_tokenizer_files(path)


def load_model(
    path: str | Path, device: str | torch.device | None = None, config: GPTConfig | None = None
) -> GPT:
    """Build the model from `path` (any registered format) and load its weights, shard by shard. `config`
    overrides the stored one (e.g. a new rope_scaling); the weights must still fit it."""
    path = recover(Path(path))
    fmt = format_of(path)
    config = config or fmt.config(path)
    model = empty_model(config)
    expected, loaded = set(model.state_dict()), set()
    for state in fmt.tensors(path, config):
        load_state(model, state, source=str(path), partial=True)
        loaded |= set(state)
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(
            f"{path} does not match the config: missing {missing[:4]}; is the checkpoint complete?"
        )
    model.eval()
    return model.to(device) if device is not None else model


def empty_model(config: GPTConfig, device: str | torch.device = "cpu") -> GPT:
    """A GPT whose parameters are allocated but not initialised (every one is about to be loaded): skips
    the random init, seconds for a real model."""
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device)
    # non-persistent buffers (RoPE frequencies, ALiBi slopes) are in no state dict: build them for real
    model.positions = build_positions(config).to(device)
    return model


def load_state(model: GPT, state: dict[str, torch.Tensor], source: str = "weights", partial=False) -> None:
    """Copy `state` into `model`: every tensor must have a parameter of its shape (and, unless `partial`,
    every parameter a tensor)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(
            f"{source}: weights do not fit the config ({str(e).splitlines()[-1].strip()})"
        ) from None
    if unexpected or (missing and not partial):
        raise CheckpointError(
            f"{source} does not match the config: "
            + ("" if partial else f"missing {sorted(missing)[:4]}, ")
            + f"unexpected {sorted(unexpected)[:4]}"
        )


# -- longctx's own directory -----------------------------------------------------------------------------
def recover(path: Path) -> Path:
    """The checkpoint at `path` (a catalogue name: its pulled copy). If a save was killed between its two
    renames, the previous checkpoint sits at `<path>.old`: it is moved back."""
    path = resolve(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        old.rename(path)
    return path


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_checkpoint(
    path: str | Path,
    model: GPT,
    tokenizer: Tokenizer | Any | None = None,
    *,
    trainer_state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    config: GPTConfig | None = None,
) -> Path:
    """Write `model` (with `config` instead of its own, e.g. a longer trained length) atomically to `path`.
    tokenizer: anything with `save(directory)` (a tokenizer, or `SideFiles` of an HF source)."""
    path = recover(Path(path))  # a save killed between its renames left the last one aside: back first
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_tmp(path)
    (config or model.config).save(tmp / CONFIG)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": "longctx"})
    (tokenizer or load_tokenizer_files(None)).save(tmp)
    if trainer_state is not None:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / OPTIMIZER)
    _replace_dir(tmp, path)
    return path


def _fresh_tmp(path: Path) -> Path:
    """An empty `<path>.tmp-<pid>` directory for a new save (`_clean_stale` first)."""
    tmp = _clean_stale(path)
    tmp.mkdir()
    return tmp


def _clean_stale(path: Path) -> Path:
    """Remove the `<path>.tmp-<pid>` leftovers of killed saves (their process gone), so interrupted runs do
    not pile up copies; returns this process's temporary name for `path`."""
    for stale in path.parent.glob(path.name + ".tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    return path.with_name(path.name + f".tmp-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _replace_dir(tmp: Path, path: Path) -> None:
    """Make the finished `tmp` the directory `path`: data on disk first, then two renames."""
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        if f.is_file():
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


def _is_longctx_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).exists() and not is_hf_directory(path)


def _longctx_tensors(path: Path, config: GPTConfig) -> Iterator[dict[str, torch.Tensor]]:
    weights = path / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{path} has no {WEIGHTS}; is it a longctx checkpoint directory?")
    try:
        yield load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt or truncated ({e}); retrain or restore it") from None


TRAINABLE = "trainable.safetensors"


def save_training_state(
    path: str | Path, tensors: dict[str, torch.Tensor], trainer_state: dict, optimizer_state: dict
) -> Path:
    """A resumable training state that is not a whole model (a fine-tune's adapter and head): the trainable
    tensors, the trainer's and the optimizer's state, written atomically like a checkpoint."""
    path = recover(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_tmp(path)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(cpu, str(tmp / TRAINABLE), metadata={"format": "pt", "producer": "longctx"})
    (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    torch.save(optimizer_state, tmp / OPTIMIZER)
    _replace_dir(tmp, path)
    return path


def load_training_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict] | None:
    """(tensors, trainer state, optimizer state) of `save_training_state`, or None when there is none."""
    path = recover(Path(path))
    if not (path / TRAINABLE).exists():
        return None
    ts, opt = load_trainer_state(path)
    if ts is None or opt is None:
        raise CheckpointError(f"{path} is an incomplete training state; start the run afresh")
    try:
        tensors = load_file(str(path / TRAINABLE))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / TRAINABLE} is corrupt ({e}); start the run afresh") from None
    return tensors, ts, opt


def load_trainer_state(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    path = recover(Path(path))
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
    path = recover(Path(path))
    fmt = format_of(path)
    config = fmt.config(path)
    try:
        tok = fmt.tokenizer(path)
        tok_desc = f"{type(tok).__name__} (vocab {tok.vocab_size})"
    except (CheckpointError, ConfigError) as e:
        tok_desc = f"unavailable: {e}"
    with torch.device("meta"):
        n = GPT(config).num_parameters()
    check_shapes(path, fmt, config)
    ts, _ = load_trainer_state(path) if fmt.name == "longctx" else (None, None)
    out = {
        "path": str(path),
        "format": fmt.name,
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


def check_shapes(path: Path, fmt: CheckpointFormat, config: GPTConfig) -> None:
    """The stored tensors' names and shapes (file headers only) against what the config builds."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    stored = fmt.shapes(path, config)
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    wrong = [
        f"{k} {stored[k]} (config: {expected[k]})"
        for k in expected
        if k in stored and stored[k] != expected[k]
    ]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:3]}" * bool(missing), f"unexpected {unexpected[:3]}" * bool(unexpected),
                 f"shapes {wrong[:2]}" * bool(wrong)]  # fmt: skip
        raise CheckpointError(
            f"{path}: the weights do not match the config: " + "; ".join(p for p in parts if p)
        )


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is corrupt or truncated ({e}); restore it or convert again") from None


def _longctx_shapes(path: Path, config: GPTConfig) -> dict[str, tuple[int, ...]]:
    if not (path / WEIGHTS).exists():
        raise CheckpointError(f"{path} has no {WEIGHTS}; is it a longctx checkpoint directory?")
    return _safetensors_shapes(path / WEIGHTS)


# -- Hugging Face directories ----------------------------------------------------------------------------
WEIGHT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
# files that travel beside the weights unchanged (tokenizer, chat template, generation defaults)
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def is_hf_directory(path: str | Path) -> bool:
    cfg = Path(path) / CONFIG
    if not cfg.exists():
        return False
    try:
        d = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (
        isinstance(d, dict)
        and d.get("model_type") != "longctx"
        and ("architectures" in d or "model_type" in d)
    )


def read_json(path: Path, what: str) -> Any:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name}; is it {what}?") from None
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8
        raise CheckpointError(f"{path} is not valid JSON ({str(e)[:100]})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def read_chat_template(path: str | Path) -> str | None:
    path = Path(path)
    if (path / "chat_template.jinja").exists():  # transformers >= 4.50 layout
        return (path / "chat_template.jinja").read_text()
    try:
        template = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return template if isinstance(template, str) else None


def hf_config(path: str | Path) -> GPTConfig:
    """GPTConfig of the Hugging Face model directory `path` (plus its chat template, if any)."""
    d = read_json(Path(path) / CONFIG, "a Hugging Face model directory")
    try:
        config = hf.config_from_hf_dict(d)
    except (TypeError, ValueError, AttributeError) as e:  # a field of the wrong type (ConfigError passes)
        if isinstance(e, ConfigError):
            raise ConfigError(f"{Path(path) / CONFIG}: {e}") from None
        raise CheckpointError(f"{Path(path) / CONFIG} has a field of the wrong type ({e})") from None
    template = read_chat_template(path)
    if template is not None:
        config.extra["chat_template"] = template
    return config


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of an HF directory, shards in index order."""
    path = Path(path)
    for index, single in WEIGHT_FILES:
        if (path / index).exists():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path / index} is not a valid shard index ({e})") from None
            files = [path / f for f in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.exists()]
            if absent:
                raise CheckpointError(f"{path} lacks shards {absent[:3]} listed in {index}; copy them in")
            return files
        if (path / single).exists():
            return [path / single]
    raise CheckpointError(
        f"{path} has no model.safetensors (or shard index); convert .bin/.pt weights with "
        "transformers' save_pretrained(safe_serialization=True)"
    )


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file), device="cpu")
        # weights_only: the unpickler accepts tensors and plain containers only, never code
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"refused to unpickle {file}: it holds more than tensors, and unpickling it could run code; "
            "convert it to safetensors where you trust it (transformers' save_pretrained(safe_serialization"
            "=True)) and load that"
        ) from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {file} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); it may be corrupt "
            "or truncated -- restore or re-download it"
        ) from None


def _hf_shapes(path: Path, config: GPTConfig) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for f in weight_files(path):
        if f.suffix != ".safetensors":  # a pickle's shapes need unpickling: its load checks them instead
            with torch.device("meta"):
                return {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
        for name, shape in _safetensors_shapes(f).items():
            ours = hf.our_param_name(name, config)
            if ours is not None:
                out[ours] = shape
    return out


def _hf_tensors(path: Path, config: GPTConfig) -> Iterator[dict[str, torch.Tensor]]:
    from tqdm import tqdm

    files = weight_files(path)
    for f in tqdm(files, desc="loading shards", disable=len(files) < 2):
        yield hf.state_from_hf(read_weights(f), config)


class SideFiles:
    """Stands in for a tokenizer in `save_checkpoint`: its `save` copies the HF tokenizer files, chat template
    and generation config across unchanged (so special tokens and templates survive exactly)."""

    def __init__(self, source: str | Path):
        self.files = [Path(source) / f for f in SIDE_FILES if (Path(source) / f).exists()]

    def save(self, directory: str | Path) -> None:
        for f in self.files:
            shutil.copyfile(f, Path(directory) / f.name)


def import_from_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """HF directory -> longctx checkpoint directory (weights renamed, tokenizer files copied)."""
    return save_checkpoint(out_dir, load_model(hf_dir), SideFiles(hf_dir))


def save_hf_weights(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    """safetensors in HF's names; shards plus model.safetensors.index.json when larger than one shard."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt", "producer": "longctx"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _token_ids(source: Path | None) -> dict[str, Any]:
    """bos/eos/pad ids of a longctx tokenizer, for config.json of a model that has no HF origin."""
    if source is None or not (source / "tokenizer_config.json").exists():
        return {}
    try:
        tok = load_tokenizer_files(source)
    except (CheckpointError, ConfigError, OSError, ValueError):  # a convenience; the files are copied anyway
        return {}
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def export_to_hf(
    ckpt_or_model: str | Path | GPT,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    architecture: str | None = None,
    lora: str = "error",
    keep_sliding_window: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write an HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads (and vLLM serves).

    ckpt_or_model: a checkpoint (any format) or a GPT. tokenizer_dir: where the tokenizer files come from
    (default: the checkpoint directory). dtype: of the saved weights (default: the dtype the HF source
    recorded, else the model's). architecture: llama / mistral / qwen2 (default: the family it came from,
    else llama, or qwen2 for q/k/v-only biases). lora: see `longctx.peft.plain_state`. Written atomically:
    a failed export leaves no half-written directory."""
    from longctx.peft import plain_state

    source = None if isinstance(ckpt_or_model, GPT) else Path(ckpt_or_model)
    model = ckpt_or_model if source is None else load_model(source)
    tok_source = Path(tokenizer_dir) if tokenizer_dir is not None else source
    config = model.config
    dtype = dtype or hf.dtype_of_hf_config(config.extra.get("hf_config", {})) or model.head_weight.dtype
    hf_cfg = hf.hf_config_dict(
        config, architecture=architecture, dtype=dtype, keep_sliding_window=keep_sliding_window
    )
    if "hf_config" not in config.extra:
        hf_cfg.update({k: v for k, v in _token_ids(tok_source).items() if k not in hf_cfg})
    hf_state = hf.state_to_hf(plain_state(model, lora), dtype)

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_tmp(out)
    save_hf_weights(hf_state, tmp, max_shard_bytes)
    (tmp / CONFIG).write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if tok_source is not None and tok_source.is_dir():
        SideFiles(tok_source).save(tmp)
    template = config.extra.get("chat_template")
    if template and read_chat_template(tmp) is None:
        (tmp / "chat_template.jinja").write_text(template)
    if out.exists() and out.is_dir():
        # an export replaces an earlier export's weights; other files in the folder are left in place
        for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
            old.unlink(missing_ok=True)
        for item in tmp.iterdir():
            item.replace(out / item.name)
        tmp.rmdir()
    else:
        tmp.rename(out)
    return out


# -- GGUF files (llama.cpp) ------------------------------------------------------------------------------
def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


@functools.lru_cache(maxsize=2)
def _gguf(path: str, mtime_ns: int, size: int):
    """(metadata, tensors) of a GGUF file, read once per file version (config, weights and tokenizer all
    come from it; parsing a 50K-token vocabulary takes seconds)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, IndexError, struct errors...
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:80]}); it may be truncated "
            "-- download or convert it again"
        ) from None
    return meta, reader.tensors


def read_gguf(path: str | Path):
    p = Path(path)
    st = p.stat()
    return _gguf(str(p.resolve()), st.st_mtime_ns, st.st_size)


def _gguf_config(path: Path) -> GPTConfig:
    meta, tensors = read_gguf(path)
    return gguf.config_from_gguf(meta, [t.name for t in tensors])


def _gguf_tensors(path: Path, config: GPTConfig) -> Iterator[dict[str, torch.Tensor]]:
    from gguf.quants import dequantize
    from tqdm import tqdm

    _, tensors = read_gguf(path)
    state = {}
    for t in tqdm(
        tensors, desc=f"reading {path.name}", unit="tensor", leave=False, disable=len(tensors) < 64
    ):
        kind = t.tensor_type.name
        if kind not in gguf.READ_TYPES:
            raise CheckpointError(
                f"{path.name}: tensor {t.name} is {kind}, a type longctx does not read; it reads "
                f"{', '.join(gguf.READ_TYPES)} (requantize with llama.cpp's llama-quantize, e.g. to Q8_0)"
            )
        try:
            array = dequantize(t.data, t.tensor_type)
        except (ValueError, IndexError) as e:
            raise CheckpointError(f"{path.name}: tensor {t.name} is truncated or corrupt ({e})") from None
        item = gguf.tensor_from_gguf(t.name, array.reshape([int(n) for n in reversed(t.shape)]), config)
        if item is not None:
            state[item[0]] = item[1]
    yield state


QUANT_BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1")  # the block formats longctx.infer.quant runs as they are


def gguf_blocks(path: str | Path) -> dict[str, tuple[str, np.ndarray]]:
    """The quantized matrices of the GGUF file behind a checkpoint, as stored: {our parameter name: (ggml
    type, uint8 blocks (rows, bytes per row))} for Q8_0/Q4_0/Q4_1 tensors (Q/K rows un-permuted: blocks run
    along a row, so permuting rows keeps them whole). The file is the checkpoint itself, or the original
    `longctx pull` kept beside its converted copy; {} when there is none. The caller checks the blocks
    still dequantize to the weights (`longctx.infer.quant`)."""
    p = recover(Path(path))
    if p.is_dir() and (p / MANIFEST).exists() and is_gguf_file(p / GGUF_NAME):
        p = p / GGUF_NAME
    if not is_gguf_file(p):
        return {}
    config = _gguf_config(p)
    out = {}
    for t in read_gguf(p)[1]:
        ours = gguf.our_name(t.name)
        if ours is None or t.tensor_type.name not in QUANT_BLOCK_TYPES:
            continue
        rows = np.asarray(t.data).reshape(int(t.shape[-1]), -1)
        heads = gguf.permuted_heads(ours, config)
        out[ours] = (t.tensor_type.name, gguf.unpermute(rows, heads) if heads is not None else rows)
    return out


def _gguf_shapes(path: Path, config: GPTConfig) -> dict[str, tuple[int, ...]]:
    out = {}
    for t in read_gguf(path)[1]:
        ours = gguf.our_name(t.name)
        if ours is not None and not (ours == "lm_head.weight" and config.tie_embeddings):
            out[ours] = tuple(int(n) for n in reversed(t.shape))
    return out


def _gguf_tokenizer(path: Path) -> Tokenizer:
    from longctx.data.tokenizer import HFTokenizer

    tok, config = gguf.tokenizer_from_gguf(read_gguf(path)[0])
    return HFTokenizer(tok, config)


def export_to_gguf(
    ckpt_or_model: str | Path | GPT,
    out: str | Path,
    *,
    outtype: str = "f32",
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write a GGUF file llama.cpp runs as it is: weights in `outtype` (f32 | f16 | bf16 | q8_0), the config
    (a RoPE extension included: llama.cpp reads `rope.scaling.*`, so the new length needs no flags), the
    tokenizer. Written to a temporary file and renamed: a failed export leaves nothing at `out`."""
    import gguf as ggml
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from longctx.peft import plain_state

    source = None if isinstance(ckpt_or_model, GPT) else Path(ckpt_or_model)
    model = ckpt_or_model if source is None else load_model(source)
    tokenizer = tokenizer or (load_tokenizer(source) if source is not None else load_tokenizer_files(None))
    config = model.config
    arch, meta = gguf.gguf_metadata(config)
    tok_meta = gguf.tokenizer_to_gguf(tokenizer)
    template = config.extra.get("chat_template")
    if isinstance(template, str):
        tok_meta.setdefault("tokenizer.chat_template", template)
    tensors = []
    for name, t in plain_state(model, "merge").items():
        gname, array = gguf.tensor_to_gguf(name, t, config)
        kind = gguf.storage_type(gname, array, outtype)
        tensors.append((gname, quantize(array, GGMLQuantizationType[kind]), GGMLQuantizationType[kind]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _clean_stale(out)
    writer = ggml.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(str(config.extra.get("gguf_name") or out.stem))
        writer.add_file_type(
            {"f32": ggml.LlamaFileType.ALL_F32, "f16": ggml.LlamaFileType.MOSTLY_F16,
             "bf16": ggml.LlamaFileType.MOSTLY_BF16, "q8_0": ggml.LlamaFileType.MOSTLY_Q8_0}[outtype]
        )  # fmt: skip
        for key, value in meta.items():
            _gguf_value(writer, f"{arch}.{key}", value)
        for key, value in tok_meta.items():
            _gguf_value(writer, key, value)
        for gname, data, kind in tensors:
            writer.add_tensor(gname, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _gguf_value(writer, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


# -- the registry ----------------------------------------------------------------------------------------
def _is_hf(path: Path) -> bool:
    return path.is_dir() and is_hf_directory(path)


def _longctx_config(path: Path) -> GPTConfig:
    return GPTConfig.load(path / CONFIG)


register_format(CheckpointFormat("hf", _is_hf, hf_config, _hf_tensors, load_tokenizer_files, _hf_shapes))
register_format(
    CheckpointFormat("gguf", is_gguf_file, _gguf_config, _gguf_tensors, _gguf_tokenizer, _gguf_shapes)
)
register_format(
    CheckpointFormat(
        "longctx", _is_longctx_dir, _longctx_config, _longctx_tensors, load_tokenizer_files, _longctx_shapes
    )
)
