"""Hugging Face <-> longctx, as a pure adapter: config dict <-> GPTConfig, state dict <-> state dict, for
Llama / Mistral / Qwen2. Reading and writing the directories is `longctx.checkpoint`'s job (as torchtitan's
state-dict adapters leave I/O to the checkpointer); nothing here touches a file.

The three families are the same decoder as ours (pre-norm RMSNorm, RoPE in HF's half-split layout, SwiGLU,
GQA), so conversion is a renaming: no tensor is transposed, permuted or re-cast, and HF -> longctx -> HF gives
the same bits. What differs is bookkeeping:

- config.json keys (`hidden_size` vs `d_model`, ...). Keys we do not model (token ids, `sliding_window`,
  `dtype`, ...) are kept verbatim in `config.extra["hf_config"]` and written back on export.
- RoPE settings come in two layouts: transformers < 5 writes `rope_scaling` (`type` or `rope_type`) beside a
  top-level `rope_theta`; transformers >= 5 writes `rope_parameters` holding both. We read either (the older
  key wins, as in transformers 5) and write both, so every engine (transformers 4/5, vLLM) reads the same
  positions. Our `config.rope_scaling` holds the HF dict minus `rope_theta` (that is `config.rope_theta`).

Attention is always full attention here. A Mistral/Qwen2 `sliding_window` smaller than the model's context is
reported at import (outputs equal transformers' up to `sliding_window` tokens) and dropped at export unless
asked to keep it, so the exported model computes exactly what longctx computed, at every length.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import torch

from longctx.config import GPTConfig
from longctx.errors import CheckpointError, ConfigError
from longctx.positions.rope import ROPE_TYPES

# architecture in config.json -> model_type (the family)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ARCHITECTURE_OF = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()}


def hf_rope_types() -> dict[str, str]:
    """transformers' rope_type -> ours, from the RoPE registry (`RopeType.hf`)."""
    return {r.hf: name for name, r in ROPE_TYPES.items() if r.hf}


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
    hf_type = params.pop("rope_type", None) or legacy_type or "default"
    known = hf_rope_types()
    if hf_type not in known:
        raise CheckpointError(f"unsupported rope type {hf_type!r}; longctx reads {', '.join(known)}")
    rope_type = known[hf_type]
    if rope_type == "default":
        return theta, None, partial
    if ROPE_TYPES[rope_type].hf_original:
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
    if config.context_method is not None:
        problems.append(
            f"context_method {config.context_method.get('type')!r} (transformers has no such attention; export "
            "the checkpoint it was applied to, and apply the method at run time)"
        )
    rope = ROPE_TYPES.get(config.rope_type)
    if config.position == "rope" and not (rope and (rope.hf or rope.to_hf)):
        problems.append(
            f"rope type {config.rope_type!r} (transformers knows {', '.join(hf_rope_types())}; "
            "ntk exports as default with a larger rope_theta)"
        )
    if problems:
        raise ConfigError("cannot export to Llama/Mistral/Qwen2: the model uses " + "; ".join(problems))


def rope_to_hf(config: GPTConfig) -> dict[str, Any]:
    """Both key layouts: `rope_theta` + `rope_scaling` (transformers 4, vLLM) and `rope_parameters` (5)."""
    rope, theta = ROPE_TYPES[config.rope_type], config.rope_theta
    scaling = {k: v for k, v in (config.rope_scaling or {}).items() if k not in ("rope_type", "type")}
    if rope.to_hf is not None:  # e.g. ntk: the default type with the equivalent larger rope_theta
        rope_type, theta, scaling = rope.to_hf(config, scaling)
        rope = ROPE_TYPES[rope_type]
    rope_type = rope.hf
    if rope.hf_keys == "factor":
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


# -- weights ---------------------------------------------------------------------------------------------
def state_from_hf(hf_state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """One HF weight file's tensors -> our names (RoPE tables and a tied model's lm_head dropped)."""
    state = {}
    for name, tensor in hf_state.items():
        ours = our_param_name(name, config)
        if ours is not None:
            state[ours] = tensor
    return state


def state_to_hf(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our plain state dict (no LoRA wrappers: `longctx.peft.plain_state`) -> HF names, in `dtype` on CPU."""
    return {hf_param_name(k): v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
