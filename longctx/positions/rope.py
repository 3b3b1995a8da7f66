"""Rotary position embedding (Su et al., 2021) and its scalings, keyed exactly as Hugging Face's
`rope_scaling["rope_type"]` (the legacy key `"type"` is read too).

Every scaling is one `RopeType` record in `ROPE_TYPES` (`register_rope_type`): its init function, the keys
it reads, whether it depends on the current length, what `longctx extend --method NAME` writes, and its
name in transformers. Every list elsewhere (extension methods, HF import/export, config validation, help
texts) is derived from these records, so a new scaling is one record and nothing else.

An init function maps (config, seq_len) -> (inv_freq, attention_factor), the same contract as transformers'
`modeling_rope_utils`: inv_freq has rotary_dim/2 entries, and the attention factor multiplies cos and sin
(so q·k is scaled by its square — YaRN's temperature). The formulas, the defaults and
the order of float operations follow transformers 5.x, so a config means bit-for-bit the same frequencies
here and there (tests/positions/test_rope_hf_parity.py). Our `max_seq_len` plays HF's
`max_position_embeddings`; `original_max_position_embeddings` defaults to it where HF defaults it.

`seq_len` matters only for the length-dependent types (dynamic NTK, dynamic YaRN, LongRoPE), which the KV
cache must treat specially (see `Positions.length_dependent` and `KVCache.rotate_on_read`).

Not in transformers: `ntk` (fixed NTK-aware base change, from transformers' 4.3x-era copy and the YaRN repo)
and `dynamic_yarn` (YaRN with s = max(1, seq_len / L), from the YaRN repo).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from longctx.errors import ConfigError
from longctx.kernels import fused
from longctx.positions.base import PositionConfig, Positions, register

RopeInit = Callable[["PositionConfig", "int | None"], "tuple[torch.Tensor, float]"]

# keys every type may carry: the type itself, metadata HF keeps in the same dict (v5 `rope_parameters`),
# and the original length, which `longctx extend` records for every method
_COMMON_KEYS = {
    "rope_type",
    "type",
    "factor",
    "original_max_position_embeddings",
    "rope_theta",
    "partial_rotary_factor",
}


# -- reading and checking the rope_scaling dict -----------------------------------------------------
def _scaling(config: PositionConfig) -> dict[str, Any]:
    params = dict(config.rope_scaling or {})
    rope_type = config.rope_type
    known = ROPE_TYPES[rope_type].keys if rope_type in ROPE_TYPES else frozenset()
    unknown = sorted(set(params) - _COMMON_KEYS - known)
    if unknown:  # like HF: a warning, since real configs carry model-specific extras
        warnings.warn(
            f"rope_scaling keys {unknown} are not used by rope_type {rope_type!r} (ignored)", stacklevel=3
        )
    return params


def _number(
    params: dict[str, Any],
    key: str,
    rope_type: str,
    *,
    required: bool = True,
    minimum: float | None = None,
    default: float | None = None,
) -> float | None:
    """params[key] as a float, or a ConfigError that names the key and says how to fix it."""
    value = params.get(key)
    if value is None:
        if required:
            raise ConfigError(
                f"rope_scaling for rope_type {rope_type!r} needs {key!r}; add it, e.g. "
                f"{{'rope_type': {rope_type!r}, {key!r}: ...}} (see docs/extend.md)"
            )
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"rope_scaling[{key!r}] must be a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"rope_scaling[{key!r}] must be >= {minimum}, got {value}")
    return value


def _factor(params: dict[str, Any], rope_type: str) -> float:
    return _number(params, "factor", rope_type, minimum=1.0)


def _original_len(config: PositionConfig, params: dict[str, Any]) -> int:
    """L, the pre-extension context: HF's standardisation defaults it to max_position_embeddings."""
    value = params.get("original_max_position_embeddings", config.max_seq_len)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(
            f"rope_scaling['original_max_position_embeddings'] must be a positive integer "
            f"(the length the model was trained at), got {value!r}"
        )
    return value


# -- shared pieces ------------------------------------------------------------------------------------
def _exponents(dim: int) -> torch.Tensor:
    # 2i/d, i = 0..d/2-1, built int64 -> float32 like HF so the bits match
    return torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** _exponents(dim))


def default_rope(config: PositionConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(config.rotary_dim, config.rope_theta), 1.0


def linear_rope(config: PositionConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Position interpolation (Chen et al., 2023): every position is divided by `factor`."""
    factor = _factor(_scaling(config), "linear")
    return _base_inv_freq(config.rotary_dim, config.rope_theta) / factor, 1.0


def ntk_rope(config: PositionConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Fixed NTK-aware scaling (bloc97): base' = base * s^(d/(d-2)) — the lowest frequency is stretched by
    s, the highest is kept. Not in transformers 5 (it was in 4.3x); equals HF `dynamic` with factor 1 at
    seq_len = s * max_seq_len."""
    dim = config.rotary_dim
    factor = _factor(_scaling(config), "ntk")
    base = config.rope_theta * factor ** (dim / (dim - 2))
    return _base_inv_freq(dim, base), 1.0


def dynamic_ntk_rope(config: PositionConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Dynamic NTK (HF `dynamic`): base' = base * (s * l / L - (s - 1))^(d/(d-2)) with l = max(seq_len, L).
    Note that L is max_seq_len here, as in HF (which reads max_position_embeddings, not the original)."""
    dim, L = config.rotary_dim, config.max_seq_len
    factor = _factor(_scaling(config), "dynamic")
    seq_len = L if seq_len is None else max(seq_len, L)
    base = config.rope_theta * ((factor * seq_len / L) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(dim, base), 1.0


def _yarn_mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(
    config: PositionConfig, params: dict[str, Any], factor: float, rope_type: str
) -> tuple[torch.Tensor, float]:
    """NTK-by-parts (Peng et al., 2023): dims that rotate more than beta_fast times over L keep their
    frequency, those under beta_slow are interpolated by `factor`, a linear ramp in between."""
    dim, base = config.rotary_dim, config.rope_theta
    L = _original_len(config, params)
    attention_factor = _number(params, "attention_factor", rope_type, required=False, minimum=0.0)
    mscale = _number(params, "mscale", rope_type, required=False)
    mscale_all_dim = _number(params, "mscale_all_dim", rope_type, required=False)
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = _number(params, "beta_fast", rope_type, required=False) or 32
    beta_slow = _number(params, "beta_slow", rope_type, required=False) or 1
    if beta_fast < beta_slow:
        raise ConfigError(
            f"rope_scaling beta_fast ({beta_fast}) must be >= beta_slow ({beta_slow}); "
            "the defaults are 32 and 1"
        )
    truncate = params.get("truncate", True)

    def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times over L
        return (dim * math.log(L / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero (HF does the same)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** _exponents(dim)  # (dim/2,)
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    return inv_freq, attention_factor


def yarn_rope(config: PositionConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """YaRN with a fixed factor; attention factor 0.1 ln s + 1 (or the mscale ratio, or as given).
    As in transformers 5, an explicit `factor` wins; `factor: null` means max_seq_len / L."""
    params = _scaling(config)
    if "factor" not in params:
        raise ConfigError(
            "rope_scaling for rope_type 'yarn' needs 'factor' (the extension ratio, e.g. 8 for "
            "256 -> 2048); set it, or set it to null to use max_seq_len / "
            "original_max_position_embeddings"
        )
    factor = params["factor"]
    if factor is None:
        factor = config.max_seq_len / _original_len(config, params)
    else:
        factor = _factor(params, "yarn")
    return _yarn(config, params, factor, "yarn")


def dynamic_yarn_rope(config: PositionConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Dynamic YaRN (YaRN repo, not in transformers): YaRN with s = max(1, seq_len / L), recomputed for the
    current length; `factor`, if given, is only a record of the intended extension."""
    params = _scaling(config)
    L = _original_len(config, params)
    if params.get("factor") is not None:
        _factor(params, "dynamic_yarn")  # validate the record
    factor = max(1.0, seq_len / L) if seq_len else 1.0
    return _yarn(config, params, factor, "dynamic_yarn")


def _factor_list(params: dict[str, Any], key: str, n: int) -> list[float]:
    value = params.get(key)
    if value is None:
        raise ConfigError(
            f"rope_scaling for rope_type 'longrope' needs {key!r}: a list of rotary_dim/2 = {n} "
            "per-dimension factors (e.g. from a LongRoPE search or a Phi-3 config)"
        )
    if (
        not isinstance(value, (list, tuple))
        or len(value) != n
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in value)
    ):
        raise ConfigError(
            f"rope_scaling[{key!r}] must be a list of {n} positive numbers (rotary_dim/2), got {value!r:.80}"
        )
    return [float(x) for x in value]


def longrope_rope(config: PositionConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """LongRoPE (Ding et al., 2024; HF `longrope`): inv_freq_i = 1 / (ext_i * base^(2i/d)) with ext the
    `long_factor` list when seq_len > L, else `short_factor`; attention factor sqrt(1 + ln s / ln L)."""
    params = _scaling(config)
    dim, base = config.rotary_dim, config.rope_theta
    L = _original_len(config, params)
    long_factor = _factor_list(params, "long_factor", dim // 2)
    short_factor = _factor_list(params, "short_factor", dim // 2)
    factor = _number(params, "factor", "longrope", required=False, minimum=0.0)
    if factor is None:  # Phi-3 configs: the ratio of the two lengths
        factor = config.max_seq_len / L
    attention_factor = _number(params, "attention_factor", "longrope", required=False, minimum=0.0)
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(L))
    ext = torch.tensor(long_factor if seq_len and seq_len > L else short_factor, dtype=torch.float32)
    return 1.0 / (ext * base ** _exponents(dim)), attention_factor


def llama3_rope(config: PositionConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Llama 3.1: wavelengths longer than L/low_freq_factor are divided by `factor`, shorter than
    L/high_freq_factor kept, a smooth blend between; no attention scaling."""
    params = _scaling(config)
    factor = _factor(params, "llama3")
    low = _number(params, "low_freq_factor", "llama3")
    high = _number(params, "high_freq_factor", "llama3")
    if high <= low:
        raise ConfigError(
            f"rope_scaling high_freq_factor ({high}) must be > low_freq_factor ({low}); "
            "Llama 3.1 uses 4 and 1"
        )
    L = _original_len(config, params)
    inv_freq = _base_inv_freq(config.rotary_dim, config.rope_theta)
    low_wavelen, high_wavelen = L / low, L / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (L / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


_YARN_KEYS = frozenset({"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"})


def _longrope_from_yarn(config: PositionConfig, factor: float, L: int) -> dict[str, list[float]]:
    """LongRoPE's factors when none are given: short = 1 (the original RoPE up to L), long = YaRN's
    per-dimension interpolation ratios (NTK-by-parts), which LongRoPE's search starts from."""
    yarn = config.replace(
        rope_scaling={"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": L}
    )
    base, _ = default_rope(config)
    inv, _ = yarn_rope(yarn)
    n = config.rotary_dim // 2
    return {"short_factor": [1.0] * n, "long_factor": [float(x) for x in (base / inv).tolist()]}


def _ntk_to_hf(config: PositionConfig, scaling: dict[str, Any]) -> tuple[str, float, dict[str, Any]]:
    # fixed NTK-aware scaling is plain RoPE with a larger base: base * s^(d/(d-2)), computed as in
    # ntk_rope so the frequencies come out bit for bit the same
    dim = config.rotary_dim
    return "default", config.rope_theta * float(scaling["factor"]) ** (dim / (dim - 2)), {}


@dataclass(frozen=True)
class RopeType:
    """One RoPE type, everything the rest of longctx needs to know about it.

    extend: what `longctx extend --method NAME` writes into rope_scaling besides `factor` and
    `original_max_position_embeddings` — a dict, or a function (config, factor, L, user keys) -> dict;
    None: not an extension method. hf: the rope_type transformers knows it by (None: no HF twin; then
    `to_hf` may still export it as another type). hf_keys: "all", or "factor" when transformers reads only
    the factor (and warns about anything else). hf_original: transformers fills
    `original_max_position_embeddings` from max_position_embeddings for it."""

    name: str
    init: RopeInit
    keys: frozenset[str] = frozenset()  # rope_scaling keys it reads besides the common ones
    length_dependent: bool = False  # frequencies change with the current length (caches rotate on read)
    extend: Mapping[str, Any] | Callable[..., dict[str, Any]] | None = field(default_factory=dict)
    keeps_max_len: bool = False  # extend leaves max_seq_len at L (the formula scales from it: HF dynamic)
    hf: str | None = None
    hf_keys: str = "all"
    hf_original: bool = False
    to_hf: Callable[[PositionConfig, dict[str, Any]], tuple[str, float, dict[str, Any]]] | None = None
    summary: str = ""  # a few words for --help

    def extension_keys(self, config: PositionConfig, factor: float, L: int, user: dict[str, Any]) -> dict:
        return dict(self.extend(config, factor, L, user) if callable(self.extend) else self.extend or {})


ROPE_TYPES: dict[str, RopeType] = {}


def register_rope_type(rope: RopeType) -> RopeType:
    """Add (or replace) a RoPE type; every derived list sees it at once."""
    ROPE_TYPES[rope.name] = rope
    return rope


for _r in (
    RopeType("default", default_rope, extend=None, hf="default", hf_keys="factor", summary="plain RoPE"),
    RopeType("linear", linear_rope, hf="linear", hf_keys="factor", summary="position interpolation"),
    RopeType("ntk", ntk_rope, to_hf=_ntk_to_hf, summary="NTK-aware base change"),
    RopeType(
        "dynamic",
        dynamic_ntk_rope,
        length_dependent=True,
        keeps_max_len=True,
        hf="dynamic",
        hf_keys="factor",
        summary="dynamic NTK",
    ),
    RopeType(
        "yarn",
        yarn_rope,
        _YARN_KEYS,
        extend={"beta_fast": 32.0, "beta_slow": 1.0},
        hf="yarn",
        hf_original=True,
        summary="YaRN (NTK-by-parts + temperature)",
    ),  # fmt: skip
    RopeType(
        "dynamic_yarn",
        dynamic_yarn_rope,
        _YARN_KEYS,
        length_dependent=True,
        extend={"beta_fast": 32.0, "beta_slow": 1.0},
        summary="YaRN with s = len / L",
    ),  # fmt: skip
    RopeType(
        "longrope",
        longrope_rope,
        frozenset({"short_factor", "long_factor", "attention_factor"}),
        length_dependent=True,
        extend=lambda config, factor, L, user: (
            {} if {"short_factor", "long_factor"} <= set(user) else _longrope_from_yarn(config, factor, L)
        ),
        hf="longrope",
        hf_original=True,
        summary="LongRoPE (per-dimension factors)",
    ),
    RopeType(
        "llama3",
        llama3_rope,
        frozenset({"low_freq_factor", "high_freq_factor"}),
        extend={"low_freq_factor": 1.0, "high_freq_factor": 4.0},
        hf="llama3",
        hf_original=True,
        summary="Llama 3.1 scaling",
    ),  # fmt: skip
):
    register_rope_type(_r)


def rope_init(rope_type: str) -> RopeInit:
    """The init function of a registered type, or a ConfigError naming the known ones."""
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"unknown rope_scaling type {rope_type!r}; known: {', '.join(sorted(ROPE_TYPES))}")
    return ROPE_TYPES[rope_type].init


class _InitFunctions(Mapping):
    """Read-only views of the registry in transformers' shapes: name -> init function."""

    def __getitem__(self, name: str) -> RopeInit:
        return ROPE_TYPES[name].init

    def __iter__(self):
        return iter(ROPE_TYPES)

    def __len__(self) -> int:
        return len(ROPE_TYPES)


ROPE_INIT_FUNCTIONS: Mapping[str, RopeInit] = _InitFunctions()


def length_dependent_types() -> set[str]:
    return {name for name, r in ROPE_TYPES.items() if r.length_dependent}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (B, T, rd) with rd <= hd. Rotates the first rd dims (HF's half-split
    layout, so HF weights load unchanged) and passes the rest through (partial rotary)."""
    if fused.rope_runs(x, cos, sin):  # training on CPU: one pass forward, one backward
        return fused.rope(x, cos, sin)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, rd)
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat([xr * cos + rotate_half(xr) * sin, xp], dim=-1)


@register("rope")
class RotaryPositions(Positions):
    def __init__(self, config: PositionConfig):
        super().__init__(config)
        self.rope_type = config.rope_type
        self.init_fn = rope_init(self.rope_type)
        self.length_dependent = ROPE_TYPES[self.rope_type].length_dependent
        inv_freq, self.attention_scaling = self.init_fn(config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._dyn_cache: tuple[int, torch.Tensor, float] | None = None

    def frequencies(self, seq_len: int) -> tuple[torch.Tensor, float]:
        if not self.length_dependent:
            return self.inv_freq, self.attention_scaling
        if self._dyn_cache is None or self._dyn_cache[0] != seq_len:
            inv, af = self.init_fn(self.config, seq_len)
            self._dyn_cache = (seq_len, inv.to(self.inv_freq.device), af)
        return self._dyn_cache[1], self._dyn_cache[2]

    def rotary(self, position_ids: torch.Tensor, seq_len: int | None = None):
        """position_ids: (B, T) -> cos, sin: (B, T, rotary_dim), float32, already times the attention factor.
        seq_len: the length the frequencies are chosen for (dynamic types); default max(position)+1."""
        if seq_len is None and self.length_dependent:
            seq_len = int(position_ids.max()) + 1
        inv_freq, af = self.frequencies(seq_len or 0)
        freqs = position_ids.to(torch.float32)[..., None] * inv_freq.to(position_ids.device)  # (B, T, rd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * af, emb.sin() * af
