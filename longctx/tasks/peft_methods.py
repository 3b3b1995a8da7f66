"""Parameter-efficient fine-tuning of our GPT, one option: `--peft {lora,adapter,prefix,none}`.

- `lora`: `peft.LoraConfig` + `peft.inject_adapter_in_model` on q_proj/k_proj/v_proj/o_proj. W + (alpha/r) B A;
  B starts at zero, so the model starts as the base. Mergeable: the update folds into W.
- `adapter`: bottleneck adapters, y + up(gelu(down(y))) on a sub-layer's output before the residual add,
  `up` zero-initialised (identity at the start). Houlsby et al. 2019: after attention and after the MLP;
  Pfeiffer et al. 2020: after the MLP only. (Houlsby also trains the layer norms; here only the adapters
  train, so that "the method's own parameters" means the adapters.) Not mergeable: a nonlinear MLP on
  the residual branch is extra computation no base weight can absorb.
- `prefix`: prefix tuning (Li & Liang 2021; per-layer key/value prefixes as in P-tuning v2): each layer
  gets `prefix_len` learned keys and values per key/value head, put in front of the sequence's own. Every
  query sees the whole prefix (the causal mask starts after it: `q_offset = prefix_len`); the prefix keys
  carry no position (they are not rotated; under ALiBi they sit at distances beyond the first token) and
  the real tokens keep their positions 0..T-1. Not mergeable: extra keys are not a weight change.
- `none`: full fine-tuning, every parameter trains.

The model is wrapped from outside — `longctx.model` is untouched: LoRA replaces the projections (peft),
adapters and prefixes replace `block.attn` / `block.mlp` with wrapper modules that hold the original.
After `apply_peft` only the method's parameters have `requires_grad`; `peft_state_dict` returns exactly
those (the base checkpoint stays where it was), `load_peft_state` puts them back into a freshly wrapped
base model.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from longctx.errors import CheckpointError, ConfigError
from longctx.model import GPT, Attention

PEFT_METHODS = ("lora", "adapter", "prefix", "none")
ADAPTER_KINDS = ("houlsby", "pfeiffer")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# the substrings that name each method's own parameters in a wrapped model's state dict
_OWN_PARAMETER_MARKS = (".lora_A.", ".lora_B.", ".adapter.", ".prefix_k", ".prefix_v")


@dataclass
class PeftSpec:
    method: str = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PeftSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def mergeable(self) -> bool:
        return self.method in ("lora", "none")


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
        # (K, P, hd): the scale of the model's own keys/values at initialisation, so the prefix neither
        # dominates the softmax nor vanishes from it
        self.prefix_k = nn.Parameter(torch.randn(c.n_kv_head, n_prefix, c.head_dim) * c.init_std)
        self.prefix_v = nn.Parameter(torch.randn(c.n_kv_head, n_prefix, c.head_dim) * c.init_std)

    def forward(self, x: torch.Tensor, rope, alibi_slopes, cache=None, key_rope=None) -> torch.Tensor:
        q, k, v, q_offset = self.inner.qkv(x, rope, cache, key_rope)  # k, v: (B, K, S, hd)
        B = x.shape[0]
        pk = self.prefix_k.to(k.dtype).unsqueeze(0).expand(B, -1, -1, -1)  # (B, K, P, hd)
        pv = self.prefix_v.to(v.dtype).unsqueeze(0).expand(B, -1, -1, -1)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, K, P+S, hd)
        # query i sits at key index P + q_offset + i: it sees the whole prefix and, if causal, the tokens
        # up to itself
        return self.inner.attend(q, k, v, self.n_prefix + q_offset, alibi_slopes)


def apply_peft(model: GPT, spec: PeftSpec) -> GPT:
    """Wrap `model` in place for `spec.method`; afterwards only the method's parameters train."""
    spec.validate()
    if spec.method == "none":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    c = model.config
    if spec.method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(
            r=spec.lora_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=list(LORA_TARGETS),
            bias="none",
        )
        inject_adapter_in_model(cfg, model)
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
    device = next(model.tok_emb.parameters()).device
    model.to(device)
    return model


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
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model)
    for parent in list(merged.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, name, child.get_base_layer())
    merged.requires_grad_(True)
    return merged


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
