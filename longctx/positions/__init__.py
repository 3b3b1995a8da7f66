"""Position encodings behind one registry.

`build_positions(config)` returns the module for `config.position`; the model asks it three questions and
never looks at which kind it is:

- `embed(x, position_ids)`   additive absolute positions (learned, sinusoidal) — identity otherwise;
- `rotary(position_ids, seq_len)` -> (cos, sin) for RoPE (with its scaling from `rope_scaling`), else None;
- `alibi_slopes`              per-head slopes for ALiBi, else None.

A new kind is a new class with `@register("name")`; a new RoPE scaling is a new entry in
`longctx.positions.rope.ROPE_INIT_FUNCTIONS` keyed by the name Hugging Face uses in `rope_scaling`.
"""

from __future__ import annotations

from longctx.positions import absolute, alibi, rope  # noqa: F401  (registers the kinds)
from longctx.positions.base import REGISTRY, Positions, build_positions, register

__all__ = ["REGISTRY", "Positions", "build_positions", "register"]
