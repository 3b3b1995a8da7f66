"""GPTConfig: the one source of truth for a model's shape, saved as `config.json` beside the weights.

Field names follow our model; `to_hf_dict`-style mapping lives in `longctx.interop`. `rope_scaling` is kept
exactly in Hugging Face's layout (`{"rope_type": "yarn", "factor": 8.0, ...}`) so a checkpoint's position
config means the same thing here, in transformers and in vLLM.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longctx.errors import ConfigError

NORM_TYPES = ("rmsnorm", "layernorm")
MLP_TYPES = ("swiglu", "gelu")


def position_types() -> tuple[str, ...]:
    """The registered position encodings (longctx.positions): what `position` may name."""
    from longctx.positions import REGISTRY

    return tuple(REGISTRY)


def attention_backends() -> tuple[str, ...]:
    """'auto' and the registered attention backends (longctx.attention): what `attn_backend` may name."""
    from longctx.attention import BACKENDS

    return ("auto", *BACKENDS)


def rope_types() -> tuple[str, ...]:
    from longctx.positions.rope import ROPE_TYPES

    return tuple(ROPE_TYPES)


@dataclass
class GPTConfig:
    vocab_size: int = 260
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None  # None -> n_head (plain multi-head); fewer -> grouped-query attention
    d_model: int = 128
    d_ff: int | None = None  # None -> 4*d (gelu) or ~8/3*d rounded to 32 (swiglu)
    head_dim: int | None = None  # None -> d_model // n_head
    mlp: str = "swiglu"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    bias: bool = False  # bias in every linear layer (GPT-2 style)
    qkv_bias: bool = False  # bias only on q/k/v projections (Qwen2 style)
    tie_embeddings: bool = True
    max_seq_len: int = 256  # the context the model was trained for (HF: max_position_embeddings)
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF layout, e.g. {"rope_type": "yarn", "factor": 8.0}
    partial_rotary_factor: float = 1.0
    # a training-free context method on top of RoPE, e.g. {"type": "self_extend", "group_size": 4,
    # "window": 1024} (longctx.attention.context_methods); max_seq_len stays the trained length
    context_method: dict[str, Any] | None = None
    causal: bool = True  # False: bidirectional encoder (BERT-style)
    attn_backend: str = "auto"
    attn_chunk_size: int = 256  # key/query block for the chunked backend
    init_std: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata (chat template, hf arch, ...)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # types first: every derivation below assumes them
            _check_type(f.name, getattr(self, f.name), str(f.type))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ConfigError(
                    f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                    "pick a multiple or set head_dim explicitly"
                )
            self.head_dim = self.d_model // self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else 32 * ((8 * self.d_model // 3 + 31) // 32)
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(
            self.position in position_types(),
            f"unknown position type {self.position!r}; choose one of {', '.join(position_types())}",
        )
        need(self.norm in NORM_TYPES, f"unknown norm {self.norm!r}; choose one of {', '.join(NORM_TYPES)}")
        need(self.mlp in MLP_TYPES, f"unknown mlp {self.mlp!r}; choose one of {', '.join(MLP_TYPES)}")
        need(
            self.attn_backend in attention_backends(),
            f"unknown attention backend {self.attn_backend!r}; choose one of {', '.join(attention_backends())}",
        )
        for name in (
            "vocab_size",
            "n_layer",
            "n_head",
            "n_kv_head",
            "d_model",
            "d_ff",
            "head_dim",
            "max_seq_len",
            "attn_chunk_size",
        ):
            need(
                int(getattr(self, name)) > 0, f"{name} must be a positive integer, got {getattr(self, name)}"
            )
        need(
            self.n_head % self.n_kv_head == 0,
            f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} (grouped-query attention)",
        )
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(0.0 < self.partial_rotary_factor <= 1.0, "partial_rotary_factor must be in (0, 1]")
        if self.position == "rope":
            need(
                self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
                f"rotary dim {self.rotary_dim} must be even and positive",
            )
        if self.rope_scaling is not None:
            need(self.position == "rope", "rope_scaling is set but position is not 'rope'")
            need(isinstance(self.rope_scaling, dict), "rope_scaling must be a dict in HF layout")
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            need(
                rope_type is not None, "rope_scaling needs a 'rope_type' key, e.g. {'rope_type': 'yarn', ...}"
            )
            need(
                rope_type in rope_types(),
                f"unknown rope_scaling type {rope_type!r}; known: {', '.join(sorted(rope_types()))}",
            )

        if self.context_method is not None:
            from longctx.attention.context_methods import validate as validate_method

            validate_method(self.context_method, self.max_seq_len, self.position)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type")))

    @property
    def context_length(self) -> int:
        """The longest context this config claims to address: max_seq_len times any scaling factor, or
        what a context method reaches."""
        if self.context_method is not None:
            from longctx.attention.context_methods import METHODS, validate

            params = validate(self.context_method, self.max_seq_len, self.position)
            return max(
                self.max_seq_len,
                METHODS[self.context_method["type"]].context_length(params, self.max_seq_len),
            )
        if self.rope_scaling and "factor" in self.rope_scaling and self.rope_type != "dynamic":
            orig = self.rope_scaling.get("original_max_position_embeddings", self.max_seq_len)
            return max(self.max_seq_len, int(orig * float(self.rope_scaling["factor"])))
        return self.max_seq_len

    # -- presets and (de)serialisation -------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "longctx", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> GPTConfig:
        """A config from a dict (a config.json's content), every field checked against its type; the error
        names the source, the field and the type expected. The shape fields must be there: a config without
        them would silently take the defaults of a model it does not describe."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} must hold a JSON object of config fields, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields) - {"model_type"})
        if unknown:
            raise ConfigError(
                f"{source} has unknown keys {unknown}; is this a longctx config.json? "
                "(Hugging Face directories go through `longctx convert from-hf`)"
            )
        missing = [name for name in REQUIRED_FIELDS if name not in d]
        if missing:
            raise ConfigError(
                f"{source} lacks {', '.join(map(repr, missing))}; the checkpoint's config is incomplete"
            )
        try:
            return cls(**{k: v for k, v in d.items() if k in fields})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GPTConfig:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config at {path}") from None
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8
            raise ConfigError(
                f"{path} is not valid JSON ({str(e)[:100]}); the checkpoint may be corrupt"
            ) from None
        return cls.from_dict(d, source=str(path))


# the fields a saved config must state: the model's shape
REQUIRED_FIELDS = ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len")
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "dict": "an object"}  # fmt: skip


def _check_type(name: str, value: Any, annotation: str) -> None:
    """value against a field's annotation ('int', 'int | None', 'float', 'bool', 'str', 'dict[...] | None')."""
    kinds = [a.strip().split("[")[0] for a in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "dict": isinstance(value, dict),
    }
    if not any(ok.get(k, False) for k in kinds):
        expected = " or ".join(_TYPE_WORDS.get(k, k) for k in kinds if k != "None")
        raise ConfigError(f"field {name!r} must be {expected}, got {json.dumps(value, default=repr)[:40]}")


PRESETS: dict[str, dict[str, Any]] = {
    # ~1M parameters: the tests' model
    "tiny": dict(vocab_size=260, n_layer=4, n_head=4, d_model=128, d_ff=384, max_seq_len=256),
    # ~10M parameters: the demo's model (byte-level vocab)
    "small": dict(vocab_size=260, n_layer=6, n_head=6, n_kv_head=6, d_model=384, d_ff=1024, max_seq_len=256),
    # ~60M parameters: the benchmark config (Llama-like, vocab 32000)
    "base": dict(
        vocab_size=32000, n_layer=8, n_head=8, d_model=512, d_ff=1376, max_seq_len=1024, tie_embeddings=False
    ),
    # ~350M: for a GPU
    "medium": dict(
        vocab_size=32000,
        n_layer=24,
        n_head=16,
        d_model=1024,
        d_ff=2816,
        max_seq_len=2048,
        tie_embeddings=False,
    ),
}
