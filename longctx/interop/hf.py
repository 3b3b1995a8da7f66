"""Hugging Face <-> longctx: config keys, weight names, import and export of Llama / Mistral / Qwen2.

The three families are the same decoder as ours (pre-norm RMSNorm, RoPE in HF's half-split layout, SwiGLU,
GQA), so conversion is a renaming: no tensor is transposed, permuted or re-cast, and HF -> longctx -> HF gives
the same bits. What differs is bookkeeping:

- config.json keys (`hidden_size` vs `d_model`, ...). Keys we do not model (token ids, `sliding_window`,
  `dtype`, ...) are kept verbatim in `config.extra["hf_config"]` and written back on export.
- RoPE settings come in two layouts: transformers < 5 writes `rope_scaling` (`type` or `rope_type`) beside a
  top-level `rope_theta`; transformers >= 5 writes `rope_parameters` holding both. We read either (the older
  key wins, as in transformers 5) and write both, so every engine (transformers 4/5, vLLM) reads the same
  positions. Our `config.rope_scaling` holds the HF dict minus `rope_theta` (that is `config.rope_theta`).
- Weights load only from safetensors, or from `pytorch_model.bin` through `torch.load(weights_only=True)`,
  which refuses anything but tensors (no code can run while loading).

Attention is always full attention here. A Mistral/Qwen2 `sliding_window` smaller than the model's context is
reported at import (outputs equal transformers' up to `sliding_window` tokens) and dropped at export unless
asked to keep it, so the exported model computes exactly what longctx computed, at every length.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from longctx.config import GPTConfig
from longctx.errors import CheckpointError, ConfigError
from longctx.model import GPT

# architecture in config.json -> model_type (the family)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ARCHITECTURE_OF = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()}
HF_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# ours -> an HF type: `ntk` (fixed NTK-aware) is the default type with a larger rope_theta
_EXPORTABLE_ROPE_TYPES = (*HF_ROPE_TYPES, "ntk")
# types for which transformers reads nothing but `factor`
_FACTOR_ONLY_TYPES = ("default", "linear", "dynamic")
# rope types whose `original_max_position_embeddings` transformers fills from max_position_embeddings
_NEEDS_ORIGINAL_MAX = ("llama3", "yarn", "longrope")

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

# config.json keys that become GPTConfig fields (everything else goes to extra["hf_config"])
_MAPPED_KEYS = {
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "attention_bias",
    "mlp_bias",
    "initializer_range",
    "transformers_version",
    "_name_or_path",
}

# module paths: ours <-> HF. Per layer ("blocks.{i}." <-> "model.layers.{i}.") and top level.
_LAYER_MODULES = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
}
_TOP_MODULES = {"tok_emb": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_HF_LAYER_MODULES = {v: k for k, v in _LAYER_MODULES.items()}
_HF_TOP_MODULES = {v: k for k, v in _TOP_MODULES.items()}
# HF tensors that carry no weights of ours: RoPE tables old Llama checkpoints saved
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

WEIGHT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


# -- names -------------------------------------------------------------------------------------------------
def hf_module_path(ours: str) -> str:
    """'blocks.3.attn.q_proj' -> 'model.layers.3.self_attn.q_proj' (KeyError when there is no HF twin)."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", ours)
    if m:
        return f"model.layers.{m[1]}.{_LAYER_MODULES[m[2]]}"
    return _TOP_MODULES[ours]


def our_module_path(hf: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'blocks.3.attn.q_proj' (KeyError when we have no such module)."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if m:
        return f"blocks.{m[1]}.{_HF_LAYER_MODULES[m[2]]}"
    return _HF_TOP_MODULES[hf]


def _split_param(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def hf_param_name(ours: str) -> str:
    module, leaf = _split_param(ours)
    try:
        return f"{hf_module_path(module)}.{leaf}"
    except KeyError:
        raise ConfigError(f"weight {ours!r} has no Hugging Face equivalent") from None


def our_param_name(hf: str, config: GPTConfig) -> str | None:
    """HF tensor name -> ours; None for tensors to skip (RoPE tables, lm_head of a tied model)."""
    if _IGNORED_HF.fullmatch(hf) or (hf == "lm_head.weight" and config.tie_embeddings):
        return None
    module, leaf = _split_param(hf)
    try:
        return f"{our_module_path(module)}.{leaf}"
    except KeyError:
        raise CheckpointError(
            f"unexpected tensor {hf!r} in the Hugging Face checkpoint: not part of a "
            f"{'/'.join(SUPPORTED_ARCHITECTURES)} model"
        ) from None


# -- config ------------------------------------------------------------------------------------------------
def read_hf_config(path: str | Path) -> dict[str, Any]:
    cfg = Path(path) / "config.json"
    try:
        return json.loads(cfg.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face model directory?") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is not valid JSON ({e})") from None


def hf_family(d: dict[str, Any]) -> str:
    """The family of an HF config dict, or CheckpointError naming the supported architectures."""
    archs = d.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    if not archs and d.get("model_type") in ARCHITECTURE_OF:
        return d["model_type"]
    found = ", ".join(archs) or f"model_type {d.get('model_type')!r}"
    raise CheckpointError(
        f"unsupported architecture {found}; longctx reads "
        f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 1/2/3, Mistral, Qwen2)"
    )


def rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(rope_theta, rope_scaling in our form, partial_rotary_factor) from either key layout, normalized the
    way transformers normalizes it, so our frequencies are the ones transformers computes."""
    # transformers 5: `rope_scaling or rope_parameters` -- the older key wins when both are present
    params = copy.deepcopy(d.get("rope_scaling") or d.get("rope_parameters") or {})
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(
            f"unsupported rope settings {params!r}: expected one flat rope_scaling / "
            "rope_parameters dict (per-layer-type RoPE is not supported)"
        )
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    partial = float(params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
    legacy_type = params.pop("type", None)
    rope_type = params.pop("rope_type", None) or legacy_type or "default"
    if rope_type not in HF_ROPE_TYPES:
        raise CheckpointError(
            f"unsupported rope type {rope_type!r}; longctx reads {', '.join(HF_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None, partial
    if rope_type in _NEEDS_ORIGINAL_MAX:
        # transformers gives a top-level original_max_position_embeddings priority (Phi-3 style)
        params["original_max_position_embeddings"] = int(
            d.get(
                "original_max_position_embeddings",
                params.get("original_max_position_embeddings", d["max_position_embeddings"]),
            )
        )
    return theta, {"rope_type": rope_type, **params}, partial


def _bias_from_hf(d: dict[str, Any], family: str) -> dict[str, bool]:
    if family == "qwen2":
        return {"qkv_bias": True, "bias": False}  # Qwen2 hard-codes bias on q/k/v only
    attn_bias, mlp_bias = bool(d.get("attention_bias", False)), bool(d.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise CheckpointError(
            f"attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported: longctx "
            "has biases on all linear layers (bias) or on q/k/v only (qkv_bias)"
        )
    return {"qkv_bias": False, "bias": attn_bias}


def _sliding_window(d: dict[str, Any], family: str) -> int | None:
    if family == "qwen2" and not d.get("use_sliding_window", False):
        return None
    return d.get("sliding_window")


def config_from_hf_dict(d: dict[str, Any]) -> GPTConfig:
    family = hf_family(d)
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"hidden_act={act!r} is not supported; longctx's gated MLP is SwiGLU (silu)")
    theta, scaling, partial = rope_from_hf(d)
    n_head = int(d["num_attention_heads"])
    window = _sliding_window(d, family)
    if window is not None and window < int(d["max_position_embeddings"]):
        warnings.warn(
            f"sliding_window={window} < max_position_embeddings={d['max_position_embeddings']}: "
            f"longctx attends to the whole context, so outputs match transformers only up to "
            f"{window} tokens; export drops the window (keep_sliding_window=True keeps it)",
            UserWarning,
            stacklevel=3,
        )
    kept = {k: v for k, v in d.items() if k not in _MAPPED_KEYS}
    try:
        return GPTConfig(
            vocab_size=int(d["vocab_size"]),
            n_layer=int(d["num_hidden_layers"]),
            n_head=n_head,
            n_kv_head=int(d.get("num_key_value_heads") or n_head),
            d_model=int(d["hidden_size"]),
            d_ff=int(d["intermediate_size"]),
            head_dim=d.get("head_dim") or int(d["hidden_size"]) // n_head,
            mlp="swiglu",
            norm="rmsnorm",
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_seq_len=int(d["max_position_embeddings"]),
            position="rope",
            rope_theta=theta,
            rope_scaling=scaling,
            partial_rotary_factor=partial,
            causal=True,
            init_std=float(d.get("initializer_range", 0.02)),
            **_bias_from_hf(d, family),
            extra={"hf_architecture": ARCHITECTURE_OF[family], "hf_model_type": family, "hf_config": kept},
        )
    except KeyError as e:
        raise CheckpointError(f"Hugging Face config.json lacks {e.args[0]!r}") from None


def config_from_hf(path: str | Path) -> GPTConfig:
    """GPTConfig of the Hugging Face model directory `path` (plus its chat template, if any)."""
    config = config_from_hf_dict(read_hf_config(path))
    template = read_chat_template(path)
    if template is not None:
        config.extra["chat_template"] = template
    return config


def read_chat_template(path: str | Path) -> str | None:
    path = Path(path)
    if (path / "chat_template.jinja").exists():  # transformers >= 4.50 layout
        return (path / "chat_template.jinja").read_text()
    try:
        template = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return template if isinstance(template, str) else None


def _export_family(config: GPTConfig, architecture: str | None) -> str:
    if architecture is not None:
        family = SUPPORTED_ARCHITECTURES.get(architecture, architecture)
        if family not in ARCHITECTURE_OF:
            raise ConfigError(
                f"cannot export as {architecture!r}; choose one of "
                f"{', '.join(ARCHITECTURE_OF)} ({', '.join(SUPPORTED_ARCHITECTURES)})"
            )
    else:
        family = config.extra.get("hf_model_type")
        if family not in ARCHITECTURE_OF:
            family = "qwen2" if config.qkv_bias and not config.bias else "llama"
    # the biases each family has: Llama any (attention_bias + mlp_bias), Qwen2 exactly q/k/v, Mistral none
    if config.bias and family != "llama":
        raise ConfigError(f"bias=True (all linear layers) has no {family} equivalent; export as llama")
    if config.qkv_bias and not config.bias and family != "qwen2":
        raise ConfigError(f"qkv_bias=True (q/k/v only) has no {family} equivalent; export as qwen2")
    if family == "qwen2" and not config.qkv_bias and not config.bias:
        raise ConfigError("qwen2 always has q/k/v biases but this model has none; export as llama")
    return family


def _check_exportable(config: GPTConfig) -> None:
    """Options of ours that Llama/Mistral/Qwen2 cannot express -> ConfigError naming the option."""
    problems = []
    if config.norm != "rmsnorm":
        problems.append(f"norm={config.norm!r} (needs 'rmsnorm')")
    if config.mlp != "swiglu":
        problems.append(f"mlp={config.mlp!r} (needs 'swiglu')")
    if config.position != "rope":
        problems.append(f"position={config.position!r} (needs 'rope')")
    if not config.causal:
        problems.append("causal=False (needs a causal decoder)")
    if config.partial_rotary_factor != 1.0:
        problems.append(
            f"partial_rotary_factor={config.partial_rotary_factor} (these families rotate the whole head)"
        )
    if config.position == "rope" and config.rope_type not in _EXPORTABLE_ROPE_TYPES:
        problems.append(
            f"rope type {config.rope_type!r} (transformers knows {', '.join(HF_ROPE_TYPES)}; "
            "ntk exports as default with a larger rope_theta)"
        )
    if problems:
        raise ConfigError("cannot export to Llama/Mistral/Qwen2: the model uses " + "; ".join(problems))


def rope_to_hf(config: GPTConfig) -> dict[str, Any]:
    """Both key layouts: `rope_theta` + `rope_scaling` (transformers 4, vLLM) and `rope_parameters` (5)."""
    rope_type, theta = config.rope_type, config.rope_theta
    scaling = {k: v for k, v in (config.rope_scaling or {}).items() if k not in ("rope_type", "type")}
    if rope_type == "ntk":
        # fixed NTK-aware scaling is plain RoPE with a larger base: base * s^(d/(d-2)), computed as in
        # longctx.positions.rope.ntk_rope so the frequencies come out bit for bit the same
        dim = config.rotary_dim
        rope_type, theta = "default", theta * float(scaling["factor"]) ** (dim / (dim - 2))
    if rope_type in _FACTOR_ONLY_TYPES:
        # transformers warns about any other key here; the rest (e.g. the original length `longctx extend`
        # records) is our bookkeeping, unused by these formulas
        scaling = {k: v for k, v in scaling.items() if k == "factor" and rope_type != "default"}
    return {
        "rope_theta": theta,
        "rope_scaling": {"rope_type": rope_type, **scaling} if rope_type != "default" else None,
        "rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **scaling},
    }


def hf_config_dict(
    config: GPTConfig,
    *,
    architecture: str | None = None,
    dtype: torch.dtype | None = None,
    keep_sliding_window: bool = False,
) -> dict[str, Any]:
    """The config.json of the HF twin of `config` (raises ConfigError if there is none)."""
    _check_exportable(config)
    family = _export_family(config, architecture)
    kept = dict(config.extra.get("hf_config", {}))
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURE_OF[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        **rope_to_hf(config),
    }
    if family != "qwen2" or config.head_dim != config.d_model // config.n_head:
        d["head_dim"] = config.head_dim  # Qwen2Config has no such field (it reads one, though)
    if family == "llama":
        d["attention_bias"] = d["mlp_bias"] = config.bias
    if dtype is not None:
        kept.pop("torch_dtype", None)
        kept["dtype"] = str(dtype).removeprefix("torch.")
    if family == "mistral":
        kept.setdefault("sliding_window", None)  # absent, transformers would assume Mistral's 4096
    window = _sliding_window(kept, family)
    if window is not None and window < config.max_seq_len and not keep_sliding_window:
        # longctx attended to everything; a window would make transformers/vLLM compute something else
        kept["sliding_window"] = None
        if family == "qwen2":
            kept["use_sliding_window"] = False
            kept.pop("layer_types", None)
    d.update({k: v for k, v in kept.items() if k not in d})
    return d


def dtype_of_hf_config(d: dict[str, Any]) -> torch.dtype | None:
    name = d.get("dtype") or d.get("torch_dtype")
    dt = getattr(torch, str(name), None) if name else None
    return dt if isinstance(dt, torch.dtype) else None


# -- weights -----------------------------------------------------------------------------------------------
def weight_files(path: str | Path) -> list[Path]:
    """The weight files of an HF directory, shards in index order."""
    path = Path(path)
    for index, single in WEIGHT_FILES:
        if (path / index).exists():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
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
    except (SafetensorError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"cannot read {file} ({type(e).__name__}: {e}); it may be corrupt, or a pickle "
            "with more than tensors -- re-save it as safetensors"
        ) from None


def iter_hf_state(path: str | Path, config: GPTConfig) -> Iterator[dict[str, torch.Tensor]]:
    """One dict per weight file, keyed by our parameter names."""
    from tqdm import tqdm

    files = weight_files(path)
    for f in tqdm(files, desc="loading shards", disable=len(files) < 2):
        state = {}
        for name, tensor in read_weights(f).items():
            ours = our_param_name(name, config)
            if ours is not None:
                state[ours] = tensor
        yield state


def load_hf_model(
    path: str | Path, device: str | torch.device | None = None, config: GPTConfig | None = None
) -> GPT:
    """A GPT (fp32, eval mode) with the weights of the HF directory `path`; `config` overrides its
    config (e.g. a new rope_scaling) -- the weights must still fit."""
    config = config or config_from_hf(path)
    model = GPT(config)
    expected = set(model.state_dict())
    loaded: set[str] = set()
    for state in iter_hf_state(path, config):  # shard by shard: peak memory = model + one shard
        unexpected = sorted(set(state) - expected)
        if unexpected:
            raise CheckpointError(f"{path} has tensors the config does not use: {unexpected[:4]}")
        try:
            model.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise CheckpointError(
                f"{path}: weights do not fit the config ({str(e).splitlines()[-1].strip()})"
            ) from None
        loaded |= set(state)
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(f"{path} lacks weights {missing[:4]}; is the checkpoint complete?")
    model.eval()
    return model.to(device) if device is not None else model


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
    from longctx.checkpoint import save_checkpoint

    model = load_hf_model(hf_dir)
    return save_checkpoint(out_dir, model, SideFiles(hf_dir))


# -- export ------------------------------------------------------------------------------------------------
def plain_state(model: GPT, lora: str = "error") -> dict[str, torch.Tensor]:
    """Our state dict without LoRA wrappers. lora: 'error' (refuse a model with adapters), 'merge' (base +
    scaled B@A, the model itself untouched) or 'base' (base weights only; export the adapter separately
    with `export_lora_adapter`)."""
    state = model.state_dict()
    if not any(".lora_" in k for k in state):
        return state
    if lora not in ("merge", "base"):
        raise ConfigError(
            "the model carries LoRA adapters: merge them (lora='merge', CLI --lora merge) or "
            "export the base weights (lora='base') and the adapter with export_lora_adapter"
        )
    from peft.tuners.lora import LoraLayer

    plain = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    if lora == "merge":
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                for adapter in module.active_adapters:
                    delta = module.get_delta_weight(adapter).to(plain[f"{name}.weight"].dtype)
                    plain[f"{name}.weight"] = plain[f"{name}.weight"] + delta
    return plain


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
    for old in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # stale shards of an earlier export would be read too
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


def _tokenizer_config_extras(source: Path | None) -> dict[str, Any]:
    """bos/eos/pad ids of a longctx tokenizer, for config.json of a model that has no HF origin."""
    if source is None or not (source / "tokenizer_config.json").exists():
        return {}
    from longctx.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(source)
    except Exception:  # noqa: BLE001 - the ids are a convenience; the tokenizer files are copied anyway
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

    ckpt_or_model: a checkpoint directory (longctx or HF) or a GPT. tokenizer_dir: where the tokenizer files
    come from (default: the checkpoint directory). dtype: of the saved weights (default: the dtype the HF
    source recorded, else the model's). architecture: llama / mistral / qwen2 (default: the family it came
    from, else llama, or qwen2 for q/k/v-only biases). lora: see `plain_state`."""
    from longctx.checkpoint import load_model

    source = None
    if isinstance(ckpt_or_model, GPT):
        model = ckpt_or_model
    else:
        source = Path(ckpt_or_model)
        model = load_model(source)
    tok_source = Path(tokenizer_dir) if tokenizer_dir is not None else source
    config = model.config
    state = plain_state(model, lora)
    dtype = dtype or dtype_of_hf_config(config.extra.get("hf_config", {})) or model.head_weight.dtype
    hf_cfg = hf_config_dict(
        config, architecture=architecture, dtype=dtype, keep_sliding_window=keep_sliding_window
    )
    if "hf_config" not in config.extra:
        hf_cfg.update({k: v for k, v in _tokenizer_config_extras(tok_source).items() if k not in hf_cfg})
    hf_state = {hf_param_name(k): v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_hf_weights(hf_state, out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if tok_source is not None and tok_source.resolve() != out.resolve():
        SideFiles(tok_source).save(out)
    template = config.extra.get("chat_template")
    if template and read_chat_template(out) is None:
        (out / "chat_template.jinja").write_text(template)
    return out
