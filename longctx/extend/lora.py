"""LoRA for context extension, the LongLoRA way: low-rank adapters (via `peft`) on the attention
projections q/k/v/o, plus the embeddings and the norms trained in full (LongLoRA's `trainable_params=
"embed,norm"`: the paper shows LoRA alone does not adapt to a new context length without them).

The model stays a `GPT` (peft's `inject_adapter_in_model` swaps the four Linear layers in place), so the
trainer sees the same object. At the end `merged_copy` folds the adapters into the weights (peft's own
merge), and `save_adapter` writes them in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`,
keys `base_model.model.<module>.lora_A.weight`, trained embeddings/norms as `modules_to_save`), which
`peft.PeftModel.from_pretrained(GPT(config), dir)` loads onto the base checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from longctx.errors import ConfigError
from longctx.model import GPT

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def lora_config(r: int = 8, alpha: int = 16, dropout: float = 0.05, targets=LORA_TARGETS):
    """LongLoRA's defaults: rank 8, alpha 16, dropout 0.05 on q/k/v/o."""
    from peft import LoraConfig

    if r <= 0 or alpha <= 0:
        raise ConfigError(f"LoRA rank and alpha must be positive, got r={r}, alpha={alpha}")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")


def full_modules(model: GPT) -> list[str]:
    """Names of the modules LongLoRA trains in full: embeddings (tokens, a learned position table) and
    norms. An untied LM head stays frozen, as in LongLoRA."""
    kinds = (nn.Embedding, nn.RMSNorm, nn.LayerNorm)
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def add_lora(model: GPT, config=None, *, train_embeddings_and_norms: bool = True) -> GPT:
    """Inject LoRA adapters into `model` in place; everything else is frozen except (by default) the
    embeddings and norms. Returns the same model."""
    from peft import inject_adapter_in_model

    config = config or lora_config()
    inject_adapter_in_model(config, model)  # also freezes every non-LoRA parameter
    if train_embeddings_and_norms:
        for name in full_modules(model):
            model.get_submodule(name).requires_grad_(True)
    return model


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def merged_copy(model: GPT) -> GPT:
    """A plain GPT with every adapter merged into its base weight (W + B A * alpha/r); `model` is left as it
    is, so training can go on (the trainer calls this for each checkpoint it saves)."""
    layers = _lora_layers(model)
    if not layers:
        return model
    out = copy.deepcopy(model)
    for name, layer in _lora_layers(out):
        layer.merge()
        parent_name, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent_name), attr, layer.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(out, attr):
            delattr(out, attr)
    out.requires_grad_(False)
    return out


def save_adapter(model: GPT, directory: str | Path, *, base_model: str | None = None) -> Path:
    """Write the adapters (and the fully trained embeddings/norms) in PEFT's on-disk format."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not _lora_layers(model):
        raise ConfigError("the model has no LoRA adapters to save; train with --lora")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.peft_config["default"])
    trained = [
        name
        for name in full_modules(model)
        if any(p.requires_grad for p in model.get_submodule(name).parameters())
    ]
    config.modules_to_save = trained or None
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    state = dict(get_peft_model_state_dict(model))  # <module>.lora_A.weight, ...
    for name in trained:
        for pname, p in model.get_submodule(name).named_parameters():
            state[f"{name}.{pname}"] = p
    tensors = {_PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(directory))
    return directory


def trainable_summary(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (
        f"{train / 1e6:.3f}M of {total / 1e6:.3f}M parameters trainable ({100 * train / max(1, total):.1f}%)"
    )


def lora_delta_norm(model: nn.Module) -> float:
    """|B A| summed over layers: zero at initialisation (B = 0), a cheap check that training moved it."""
    with torch.no_grad():
        return float(sum(layer.get_delta_weight("default").norm() for _, layer in _lora_layers(model)))
