"""LoRA adapters of our GPT -> a PEFT adapter directory for the Hugging Face twin of the model.

PEFT wraps modules in place, so a LoRA on our `blocks.3.attn.q_proj` holds `lora_A.<adapter>.weight` (r, in)
and `lora_B.<adapter>.weight` (out, r) — the same tensors PEFT would hold on HF's
`model.layers.3.self_attn.q_proj`. Export is then a renaming to PEFT's saved layout
(`base_model.model.<hf module>.lora_A.weight`, adapter name dropped) plus an `adapter_config.json`, so that
`peft.PeftModel.from_pretrained(hf_model, adapter_dir)` rebuilds the same function.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from longctx.errors import ConfigError
from longctx.interop.hf import hf_module_path

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _lora_layers(model: nn.Module, adapter: str) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    layers = {
        name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A
    }
    if not layers:
        raise ConfigError(f"the model has no LoRA adapter named {adapter!r}; inject one with peft first")
    for name, m in layers.items():
        if not isinstance(m.get_base_layer(), nn.Linear):
            raise ConfigError(
                f"LoRA on {name} ({type(m.get_base_layer()).__name__}): only LoRA on linear "
                "layers exports to PEFT's Hugging Face layout"
            )
        if m.use_dora.get(adapter) or adapter in getattr(m, "lora_magnitude_vector", {}):
            raise ConfigError(f"DoRA on {name} is not supported by the exporter; merge it instead")
    return layers


def _targets(hf_names: list[str]) -> list[str]:
    """Short names (q_proj, ...) when the adapter covers every module of those names in every layer, else
    the full HF module paths -- PEFT matches both, the short form is what people expect to read."""
    leaves = sorted({n.rsplit(".", 1)[1] for n in hf_names})
    in_layers = [n for n in hf_names if n.startswith("model.layers.")]
    n_layers = len({n.split(".")[2] for n in in_layers})
    every_layer = len(in_layers) == len(hf_names) == n_layers * len(leaves)
    return leaves if every_layer else sorted(hf_names)


def _trained_in_full(model: nn.Module) -> list[str]:
    """Modules outside the adapters whose own weights train (LongLoRA's embeddings and norms)."""
    out = []
    for name, m in model.named_modules():
        params = list(m.parameters(recurse=False))
        if name and params and all(p.requires_grad for p in params) and "lora_" not in name:
            if not name.endswith(".base_layer"):
                out.append(name)
    return out


def export_lora_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    adapter: str = "default",
    base_model_name_or_path: str | None = None,
    modules_to_save: list[str] | None = None,
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` for the LoRA `adapter` injected into our GPT
    (by `peft.inject_adapter_in_model` or longctx's LoRA); loadable by `peft.PeftModel.from_pretrained` on the
    model exported by `export_to_hf`. modules_to_save: our names of modules saved whole (default: those
    outside the adapters that train, e.g. LongLoRA's embeddings and norms)."""
    from peft import LoraConfig

    layers = _lora_layers(model, adapter)
    full = _trained_in_full(model) if modules_to_save is None else list(modules_to_save)
    hf_names = {name: hf_module_path(name) for name in layers}
    ranks = {hf_names[n]: int(m.r[adapter]) for n, m in layers.items()}
    alphas = {hf_names[n]: float(m.lora_alpha[adapter]) for n, m in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    first = next(iter(layers.values()))
    dropout = first.lora_dropout[adapter]
    # start from the config PEFT recorded (init, rslora, ... survive); fall back to what the layers say
    recorded = getattr(model, "peft_config", {}).get(adapter)
    cfg = copy.deepcopy(recorded) if isinstance(recorded, LoraConfig) else LoraConfig()
    cfg.r, cfg.lora_alpha = r, int(alpha) if alpha.is_integer() else alpha
    cfg.lora_dropout = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    cfg.use_rslora = bool(first.use_rslora.get(adapter, False))
    cfg.target_modules = _targets(list(hf_names.values()))
    # per-module exceptions, keyed by full HF paths (PEFT matches them as suffix regexes)
    cfg.rank_pattern = {n: v for n, v in ranks.items() if v != r}
    cfg.alpha_pattern = {n: v for n, v in alphas.items() if v != alpha}
    cfg.layers_to_transform = cfg.layers_pattern = cfg.exclude_modules = None
    cfg.modules_to_save = [hf_module_path(n) for n in full] or None
    cfg.task_type, cfg.base_model_name_or_path = "CAUSAL_LM", base_model_name_or_path
    cfg.inference_mode = True

    state = {}
    for name, m in layers.items():
        prefix = f"base_model.model.{hf_names[name]}"
        state[f"{prefix}.lora_A.weight"] = m.lora_A[adapter].weight.detach().cpu().contiguous()
        state[f"{prefix}.lora_B.weight"] = m.lora_B[adapter].weight.detach().cpu().contiguous()
        if m.lora_bias.get(adapter, False):
            state[f"{prefix}.lora_B.bias"] = m.lora_B[adapter].bias.detach().cpu().contiguous()
    for name in full:
        for pname, p in model.get_submodule(name).named_parameters(recurse=False):
            state[f"base_model.model.{hf_module_path(name)}.{pname}"] = p.detach().cpu().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out
