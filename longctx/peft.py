"""Parameter-efficient fine-tuning of our GPT, one module for every stage (`extend --lora`, `finetune --peft`,
HF export): inject, train only what the method owns, merge, save.

- `lora`: `peft.LoraConfig` + `peft.inject_adapter_in_model` on the attention projections (default q/k/v/o):
  W + (alpha/r) B A, B zero at the start, so the model starts as the base. Mergeable: the update folds into
  W. With `train_embeddings_and_norms` the embeddings and norms train in full next to the adapters — the
  LongLoRA recipe (Chen et al. 2024: LoRA alone does not adapt to a new context length without them).
- `adapter`: bottleneck adapters, y + up(gelu(down(y))) on a sub-layer's output before the residual add,
  `up` zero-initialised (identity at the start). Houlsby et al. 2019: after attention and after the MLP;
  Pfeiffer et al. 2020: after the MLP only. Not mergeable: a nonlinear MLP on the residual branch is extra
  computation no base weight can absorb.
- `prefix`: prefix tuning (Li & Liang 2021; per-layer key/value prefixes as in P-tuning v2): each layer
  gets `prefix_len` learned keys and values per key/value head, put in front of the sequence's own. Every
  query sees the whole prefix (the causal mask starts after it: `q_offset = prefix_len`); the prefix keys
  carry no position (they are not rotated; under ALiBi they sit at distances beyond the first token) and
  the real tokens keep their positions 0..T-1. Not mergeable: extra keys are not a weight change.
- `none`: full fine-tuning, every parameter trains.

The model is wrapped from outside — `longctx.model` is untouched: LoRA replaces the projections (peft),
adapters and prefixes replace `block.attn` / `block.mlp` with wrapper modules that hold the original.
After `apply_peft` only the method's parameters have `requires_grad`; `peft_state_dict` returns exactly
those, `load_peft_state` puts them back into a freshly wrapped base model, `save_lora_adapter` writes
PEFT's own on-disk format (our module names, or the HF twin's through `name_map`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from longctx.errors import CheckpointError, ConfigError
from longctx.model import GPT, Attention, ForwardContext

PEFT_METHODS = ("lora", "adapter", "prefix", "none")
ADAPTER_KINDS = ("houlsby", "pfeiffer")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# the substrings that name each method's own parameters in a wrapped model's state dict
_OWN_PARAMETER_MARKS = (".lora_A.", ".lora_B.", ".adapter.", ".prefix_k", ".prefix_v")


@dataclass
class PeftSpec:
    method: str = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    train_embeddings_and_norms: bool = False  # LongLoRA: embeddings and norms train in full (lora only)
    adapter_kind: str = "houlsby"
    adapter_size: int = 16  # bottleneck width
    prefix_len: int = 16

    def validate(self) -> None:
        if self.method not in PEFT_METHODS:
            raise ConfigError(f"unknown --peft {self.method!r}; choose one of {', '.join(PEFT_METHODS)}")
        if self.adapter_kind not in ADAPTER_KINDS:
            raise ConfigError(
                f"unknown adapter kind {self.adapter_kind!r}; choose {' or '.join(ADAPTER_KINDS)}"
            )
        for name in ("lora_r", "adapter_size", "prefix_len"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PeftSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if "lora_targets" in values:
            values["lora_targets"] = tuple(values["lora_targets"])
        return cls(**values)

    @property
    def mergeable(self) -> bool:
        return self.method in ("lora", "none")


# -- the wrappers of the adapter and prefix methods -------------------------------------------------------
class BottleneckAdapter(nn.Module):
    """(B, T, d) -> (B, T, d): y + up(gelu(down(y))), the identity at initialisation."""

    def __init__(self, d: int, size: int, init_std: float):
        super().__init__()
        self.down = nn.Linear(d, size)
        self.up = nn.Linear(size, d)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # start as the base model: the adapter adds nothing yet
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(F.gelu(self.down(y)))


class WithAdapter(nn.Module):
    """A sub-layer (attention or MLP) followed by an adapter on its output; same call signature."""

    def __init__(self, inner: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.adapter(self.inner(*args, **kwargs))


class PrefixAttention(nn.Module):
    """Attention with `n_prefix` learned keys/values per key/value head in front of the sequence's own.

    Uses the wrapped module's own steps (`Attention.qkv`, `Attention.attend`), with the prefix joined
    between them (the cache holds only real tokens, so generation works unchanged)."""

    def __init__(self, inner: Attention, n_prefix: int):
        super().__init__()
        c = inner.config
        self.inner, self.n_prefix = inner, n_prefix
        # (K, P, hd), small: at the start the prefix barely moves the softmax, the model is near the base
        self.prefix_k = nn.Parameter(torch.randn(c.n_kv_head, n_prefix, c.head_dim) * c.init_std)
        self.prefix_v = nn.Parameter(torch.randn(c.n_kv_head, n_prefix, c.head_dim) * c.init_std)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v, q_offset = self.inner.qkv(x, ctx)  # k, v: (B, K, S, hd)
        B = x.shape[0]
        pk = self.prefix_k.to(k.dtype).unsqueeze(0).expand(B, -1, -1, -1)  # (B, K, P, hd)
        pv = self.prefix_v.to(v.dtype).unsqueeze(0).expand(B, -1, -1, -1)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, K, P+S, hd)
        # query i sits at key index P + q_offset + i: it sees the whole prefix and, if causal, the tokens
        # up to itself; padded rows keep their mask, the prefix always visible
        if ctx.key_mask is not None:
            ctx = dataclasses.replace(ctx, key_mask=ctx.key_mask.prepend(self.n_prefix))
        return self.inner.attend(q, k, v, self.n_prefix + q_offset, ctx)


# -- inject ------------------------------------------------------------------------------------------------
def lora_config(spec: PeftSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(spec.lora_targets),
        bias="none",
    )


def full_modules(model: nn.Module) -> list[str]:
    """Names of the modules LongLoRA trains in full: embeddings (tokens, a learned position table) and
    norms. An untied LM head stays frozen, as in LongLoRA."""
    kinds = (nn.Embedding, nn.RMSNorm, nn.LayerNorm)
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def apply_peft(model: GPT, spec: PeftSpec) -> GPT:
    """Wrap `model` in place for `spec.method`; afterwards only the method's parameters train."""
    spec.validate()
    if spec.method == "none":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    c = model.config
    if spec.method == "lora":
        from peft import inject_adapter_in_model

        inject_adapter_in_model(lora_config(spec), model)  # also freezes every non-LoRA parameter
        if spec.train_embeddings_and_norms:
            for name in full_modules(model):
                model.get_submodule(name).requires_grad_(True)
    elif spec.method == "adapter":
        for block in model.blocks:
            if spec.adapter_kind == "houlsby":
                block.attn = WithAdapter(
                    block.attn, BottleneckAdapter(c.d_model, spec.adapter_size, c.init_std)
                )
            block.mlp = WithAdapter(block.mlp, BottleneckAdapter(c.d_model, spec.adapter_size, c.init_std))
    else:
        for block in model.blocks:
            block.attn = PrefixAttention(block.attn, spec.prefix_len)
    model.to(model.tok_emb.weight.device)
    return model


# -- what the method owns ---------------------------------------------------------------------------------
def is_peft_parameter(name: str) -> bool:
    return any(m in name for m in _OWN_PARAMETER_MARKS)


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The PEFT method's own tensors (names as in `model`): copies on the CPU; empty for `none`."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if is_peft_parameter(n)}


def load_peft_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Load the tensors of `peft_state_dict` into a model wrapped by `apply_peft` with the same spec."""
    own = {n for n, _ in model.named_parameters() if is_peft_parameter(n)}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the PEFT setup: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}; load it with the method and sizes it was trained with"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            if params[n].shape != t.shape:
                raise CheckpointError(
                    f"{source}: {n} has shape {tuple(t.shape)}, the model expects {tuple(params[n].shape)}"
                )
            params[n].copy_(t)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_summary(model: nn.Module) -> str:
    train, total = count_parameters(model)
    return (
        f"{train / 1e6:.3f}M of {total / 1e6:.3f}M parameters trainable ({100 * train / max(1, total):.1f}%)"
    )


# -- LoRA: merge and save ---------------------------------------------------------------------------------
def _lora_layers(model: nn.Module, adapter: str | None = None) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and (adapter is None or adapter in m.lora_A)
    }


def has_lora(model: nn.Module) -> bool:
    return any(".lora_" in k for k in model.state_dict())


def lora_delta_norm(model: nn.Module) -> float:
    """|B A| summed over layers: zero at initialisation (B = 0), a cheap check that training moved it."""
    with torch.no_grad():
        return float(sum(m.get_delta_weight("default").norm() for m in _lora_layers(model).values()))


def merged_copy(model: GPT) -> GPT:
    """A plain GPT with every LoRA merged into its base weight (W + B A * alpha/r); `model` keeps its
    adapters, so training can go on (the trainer calls this for each checkpoint it saves)."""
    if not _lora_layers(model):
        return model
    out = copy.deepcopy(model)
    for name, layer in _lora_layers(out).items():
        layer.merge()
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent), attr, layer.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(out, attr):
            delattr(out, attr)
    return out.requires_grad_(True)


def merge_peft(model: GPT, spec: PeftSpec) -> GPT:
    """A plain GPT computing the same function: LoRA folded into the projections (a copy; `model` keeps
    its adapters), the model itself for `none`. Adapters and prefixes cannot be merged."""
    if spec.method == "none":
        return model
    if spec.method != "lora":
        raise ConfigError(
            f"--peft {spec.method} cannot be merged into the base weights (it adds computation: "
            f"{'a bottleneck MLP' if spec.method == 'adapter' else 'extra keys and values'} per "
            "layer); load the base checkpoint with the saved adapter instead"
        )
    return merged_copy(model)


def plain_state(model: GPT, lora: str = "error") -> dict[str, torch.Tensor]:
    """Our state dict without LoRA wrappers. lora: 'error' (refuse a model with adapters), 'merge' (base +
    scaled B@A, the model itself untouched) or 'base' (base weights only; save the adapter separately with
    `save_lora_adapter`)."""
    if not has_lora(model):
        return model.state_dict()
    if lora == "merge":
        return merged_copy(model).state_dict()
    if lora != "base":
        raise ConfigError(
            "the model carries LoRA adapters: merge them (lora='merge', CLI --lora merge) or "
            "export the base weights (lora='base') and the adapter with save_lora_adapter"
        )
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def _targets(names: list[str]) -> list[str]:
    """Short names (q_proj, ...) when the adapter covers every module of those names in every layer, else
    the full module paths -- PEFT matches both, the short form is what people expect to read."""

    def layer(name: str) -> str | None:  # the layer index: the first numeric part of the path
        return next((part for part in name.split(".") if part.isdigit()), None)

    leaves = sorted({n.rsplit(".", 1)[1] for n in names})
    layers = {layer(n) for n in names}
    every_layer = None not in layers and len(names) == len(layers) * len(leaves)
    return leaves if every_layer else sorted(names)


def _trained_in_full(model: nn.Module) -> list[str]:
    """Modules outside the adapters whose own weights train (LongLoRA's embeddings and norms)."""
    out = []
    for name, m in model.named_modules():
        params = list(m.parameters(recurse=False))
        if name and params and all(p.requires_grad for p in params) and "lora_" not in name:
            if not name.endswith(".base_layer"):
                out.append(name)
    return out


def save_lora_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    adapter: str = "default",
    base_model: str | None = None,
    name_map: Callable[[str], str] | None = None,
    modules_to_save: list[str] | None = None,
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` in PEFT's layout for the LoRA `adapter`
    injected into our GPT. name_map: our module name -> the name in the model the adapter is for (None:
    our own, for `PeftModel.from_pretrained(GPT(config), dir)`; `longctx.interop.hf.hf_module_path`: the
    exported Hugging Face model). modules_to_save: our names of modules saved whole (default: those outside
    the adapters that train, e.g. LongLoRA's embeddings and norms)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    layers = _lora_layers(model, adapter)
    if not layers:
        raise ConfigError(f"the model has no LoRA adapter named {adapter!r}; train with --lora")
    for name, m in layers.items():
        if not isinstance(m.get_base_layer(), nn.Linear):
            raise ConfigError(
                f"LoRA on {name} ({type(m.get_base_layer()).__name__}): only LoRA on linear layers is saved"
            )
        if m.use_dora.get(adapter) or adapter in getattr(m, "lora_magnitude_vector", {}):
            raise ConfigError(f"DoRA on {name} is not supported by the exporter; merge it instead")
    rename = name_map or (lambda n: n)
    full = _trained_in_full(model) if modules_to_save is None else list(modules_to_save)
    names = {name: rename(name) for name in layers}
    ranks = {names[n]: int(m.r[adapter]) for n, m in layers.items()}
    alphas = {names[n]: float(m.lora_alpha[adapter]) for n, m in layers.items()}
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
    cfg.target_modules = _targets(list(names.values()))
    # per-module exceptions, keyed by full paths (PEFT matches them as suffix regexes)
    cfg.rank_pattern = {n: v for n, v in ranks.items() if v != r}
    cfg.alpha_pattern = {n: v for n, v in alphas.items() if v != alpha}
    cfg.layers_to_transform = cfg.layers_pattern = cfg.exclude_modules = None
    cfg.modules_to_save = [rename(n) for n in full] or None
    # an HF model is loaded as PeftModelForCausalLM; our GPT takes no HF keyword arguments: no task type
    cfg.task_type = "CAUSAL_LM" if name_map is not None else None
    cfg.base_model_name_or_path, cfg.inference_mode = base_model, True

    state = {}
    for name, m in layers.items():
        prefix = f"base_model.model.{names[name]}"
        state[f"{prefix}.lora_A.weight"] = m.lora_A[adapter].weight
        state[f"{prefix}.lora_B.weight"] = m.lora_B[adapter].weight
        if m.lora_bias.get(adapter, False):
            state[f"{prefix}.lora_B.bias"] = m.lora_B[adapter].bias
    for name in full:
        for pname, p in model.get_submodule(name).named_parameters(recurse=False):
            state[f"base_model.model.{rename(name)}.{pname}"] = p
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out
