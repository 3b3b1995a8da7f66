"""Training-free context extension in attention: the model's own RoPE, applied with positions remapped per
region of (query, key) pairs, so no relative distance the model never saw reaches it.

    self_extend   (Jin et al. 2024, "LLM Maybe LongLM"): keys within `window` of the query -- exact relative
                  positions; farther keys -- grouped positions (query p // G + window - window // G, key
                  p // G), which meet the exact ones at the window edge. Extended window (L - w) G + w.
    rerope        (Su 2023): beyond `window` every relative distance is `window` (query at w, key at 0).
    leaky_rerope  (Su 2023): beyond `window` distances grow by 1/`leak` per token: w + (d - w) / leak.
    dual_chunk    (An et al. 2024, ChunkLlama): chunks of c = chunk_size - local_window positions; within a
                  chunk positions are p mod c, the previous chunk sees the query at min(p mod c + c,
                  chunk_size), older chunks at min(2c - 1, chunk_size): distances stay under chunk_size.

Every method is one `ContextMethod` record in `METHODS` (its parameters and checks, its regions, the context
it reaches) and one implementation of `regions()`: what region each pair is in and how each region rotates
queries and keys. The attention itself is generic and exact:

- the fast path (fp32 on CPU, decode steps included, or bf16/fp16 inference of more than 16 queries: bf16 on
  the bf16 kernels where they run, else on fp32 copies; positions = slots: an unpadded or left-padded batch,
  with or without a KV cache)
  runs each region as causal passes of the native FlashAttention kernel over key ranges (its logsumexp
  comes with every output) and merges them per query with the online-softmax rule: O(L) memory, no L x L
  matrix at any length. Each query's keys are split between the passes (the near band and everything
  before it; DCA's chunks), so the passes together cover every key once: measured 1.04-1.21x plain
  attention at 16K and 32K (bench/context_methods_speed.py), the extra being the per-region rotations;
- the dense path (any device and dtype, positions as given: streaming caches, packed documents, 16-bit
  decode steps) builds the per-region scores for a block of queries at a time over all keys.
Keys are stored un-rotated in the KV cache. With a cache whose rows share one length (no padding) and
fp32 queries, each region's rotation of them is kept beside it (`KVCache.mapped_keys`, one more key cache
per distinct key map: Self-Extend two, Dual Chunk one), so a forward rotates only its own new keys; a decode
step is then the native decode kernel's pass per region over its one range of keys (`step_regions` hands the
same to the fused step of `longctx/infer/fused_decode.py`, which runs every layer in C). Otherwise keys are
rotated on every read, each region the keys it reads, with one cos/sin table per forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from longctx.attention import cpu_flash
from longctx.errors import ConfigError
from longctx.positions.rope import apply_rotary

Map = Callable[[Tensor], Tensor]  # positions (float) -> the positions a region rotates them at


@dataclass(frozen=True)
class Regions:
    """region(qp, kp) -> region index per pair; maps[r] = (query map, key map) of region r."""

    region: Callable[[Tensor, Tensor], Tensor]
    maps: list[tuple[Map, Map]]
    kind: str  # "band" (near = region 0 within `span`, far = region 1) | "chunk" (chunks of `span`)
    span: int


@dataclass(frozen=True)
class ContextMethod:
    name: str
    params: dict[str, tuple[type, Any]]  # name -> (type, default; None = required)
    build: Callable[[dict[str, Any]], Regions]
    check: Callable[[dict[str, Any], int], None]  # (params, trained length) -> raises ConfigError
    context_length: Callable[[dict[str, Any], int], int]  # what the model then addresses
    summary: str


def _identity(p: Tensor) -> Tensor:
    return p


def _self_extend(p: dict[str, Any]) -> Regions:
    G, w = int(p["group_size"]), int(p["window"])
    return Regions(
        region=lambda qp, kp: (qp - kp >= w).long(),
        maps=[
            (_identity, _identity),
            (lambda x: torch.floor(x / G) + (w - w // G), lambda x: torch.floor(x / G)),
        ],
        kind="band",
        span=w,
    )


def _rerope(p: dict[str, Any]) -> Regions:
    w = int(p["window"])
    return Regions(
        region=lambda qp, kp: (qp - kp >= w).long(),
        maps=[(_identity, _identity), (lambda x: torch.full_like(x, float(w)), torch.zeros_like)],
        kind="band",
        span=w,
    )


def _leaky_rerope(p: dict[str, Any]) -> Regions:
    w, k = int(p["window"]), float(p["leak"])
    return Regions(
        region=lambda qp, kp: (qp - kp >= w).long(),
        maps=[(_identity, _identity), (lambda x: x / k + (w - w / k), lambda x: x / k)],
        kind="band",
        span=w,
    )


def _dual_chunk(p: dict[str, Any]) -> Regions:
    size, local = int(p["chunk_size"]), int(p["local_window"])
    c = size - local

    def region(qp: Tensor, kp: Tensor) -> Tensor:
        gap = torch.div(qp, c, rounding_mode="floor") - torch.div(kp, c, rounding_mode="floor")
        return gap.clamp(0, 2).long()  # 0 intra, 1 successive, 2 inter

    def key(x: Tensor) -> Tensor:
        return torch.remainder(x, c)

    return Regions(
        region=region,
        maps=[
            (key, key),
            (lambda x: torch.clamp(torch.remainder(x, c) + c, max=float(size)), key),
            (lambda x: torch.full_like(x, float(min(2 * c - 1, size))), key),
        ],
        kind="chunk",
        span=c,
    )


def _positive(name: str, value: Any) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 1
    ):
        raise ConfigError(f"context method parameter {name!r} must be a number >= 1, got {value!r}")


def _check_band(p: dict[str, Any], L: int) -> None:
    _positive("window", p["window"])
    if p["window"] >= L:
        raise ConfigError(
            f"the neighbour window ({p['window']}) must be shorter than the trained length ({L}): past it the "
            "model would see distances it never saw; use a smaller --neighbor-window"
        )


def _check_self_extend(p: dict[str, Any], L: int) -> None:
    _check_band(p, L)
    _positive("group_size", p["group_size"])
    if int(p["group_size"]) != p["group_size"]:
        raise ConfigError(f"group_size must be a whole number, got {p['group_size']}")


def _check_leaky(p: dict[str, Any], L: int) -> None:
    _check_band(p, L)
    _positive("leak", p["leak"])


def _check_chunk(p: dict[str, Any], L: int) -> None:
    _positive("chunk_size", p["chunk_size"])
    _positive("local_window", p["local_window"])
    if not p["local_window"] < p["chunk_size"] <= L:
        raise ConfigError(
            f"dual chunk needs local_window ({p['local_window']}) < chunk_size ({p['chunk_size']}) <= the "
            f"trained length ({L}); the paper uses chunk_size 3/4 L and local_window L/16"
        )


def _factor_length(p: dict[str, Any], L: int) -> int:
    return int(L * float(p.get("factor") or 1.0))


METHODS: dict[str, ContextMethod] = {}


def register_method(method: ContextMethod) -> ContextMethod:
    METHODS[method.name] = method
    return method


for _m in (
    ContextMethod(
        "self_extend",
        {"group_size": (int, None), "window": (int, None), "factor": (float, 1.0)},
        _self_extend,
        _check_self_extend,
        lambda p, L: (L - int(p["window"])) * int(p["group_size"]) + int(p["window"]),
        "Self-Extend: exact positions within the window, grouped beyond",
    ),
    ContextMethod(
        "rerope",
        {"window": (int, None), "factor": (float, 1.0)},
        _rerope,
        _check_band,
        _factor_length,
        "ReRoPE: distances capped at the window",
    ),  # fmt: skip
    ContextMethod(
        "leaky_rerope",
        {"window": (int, None), "leak": (float, None), "factor": (float, 1.0)},
        _leaky_rerope,
        _check_leaky,
        _factor_length,
        "Leaky ReRoPE: distances beyond the window grow by 1/leak",
    ),  # fmt: skip
    ContextMethod(
        "dual_chunk",
        {"chunk_size": (int, None), "local_window": (int, None), "factor": (float, 1.0)},
        _dual_chunk,
        _check_chunk,
        _factor_length,
        "Dual Chunk Attention: intra-, successive- and inter-chunk positions",
    ),  # fmt: skip
):
    register_method(_m)


def validate(spec: Any, trained_length: int, position: str) -> dict[str, Any]:
    """A config's `context_method` dict checked against its record: known type, known keys, valid values."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(
            'context_method must be an object like {"type": "self_extend", "group_size": 4, ...}'
        )
    if spec["type"] not in METHODS:
        raise ConfigError(f"unknown context method {spec['type']!r}; choose one of {', '.join(METHODS)}")
    if position != "rope":
        raise ConfigError(
            f"context method {spec['type']} remaps RoPE positions; this model's positions are {position!r}"
        )
    method = METHODS[spec["type"]]
    unknown = sorted(set(spec) - set(method.params) - {"type"})
    if unknown:
        raise ConfigError(f"context method {method.name} takes {', '.join(method.params)}; unknown {unknown}")
    params = {}
    for name, (_kind, default) in method.params.items():
        value = spec.get(name, default)
        if value is None:
            raise ConfigError(f"context method {method.name} needs {name!r}")
        params[name] = value
    method.check(params, trained_length)
    return params


# -- the attention --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepRegions:
    """A decode step's regions for a query at one slot: region i reads keys [a, b) = ranges[i] of the key
    store names[stores[i]] (`KVCache.mapped_keys`), its query rotated by (q_cos[i], q_sin[i]); the new key
    enters store j rotated by (k_cos[j], k_sin[j]). Each row of the tables is RoPE's (rot,) cos or sin."""

    ranges: list[tuple[int, int]]
    stores: list[int]
    names: list[str]
    q_cos: Tensor
    q_sin: Tensor
    k_cos: Tensor
    k_sin: Tensor


class ContextAttention:
    """The attention function a forward hands every layer (`ForwardContext.method`): q, k un-rotated."""

    def __init__(self, spec: dict[str, Any], rotary: Callable[..., tuple[Tensor, Tensor]], trained: int,
                 cache=None):  # fmt: skip
        """cache: the forward's KV cache, whose `mapped_keys` keep each region's rotated keys across forwards
        (positions must not depend on the length: the rotations are then fixed per slot)."""
        params = validate(spec, trained, "rope")
        self.name, self.regions = spec["type"], METHODS[spec["type"]].build(params)
        self.rotary, self.cache = rotary, cache
        self._tables: dict[tuple, Any] = {}
        # regions sharing a key map share its stored keys (Dual Chunk's three regions rotate keys alike)
        kmaps = [kmap for _, kmap in self.regions.maps]
        self._store_names = [f"{self.name}:{kmaps.index(kmap)}" for kmap in kmaps]

    def _table(self, key: tuple, positions: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
        """(cos, sin) at `positions`, computed once per forward: this object lives one forward, whose layers
        all read the same positions, and the table (a cosine and a sine per position and frequency) cost
        about as much as rotating by it (SmolLM2 with Self-Extend on a 2-core AMD EPYC: a 12288-token
        prefill in chunks of 1024 spent 6.3 s rotating, 4.1 s with one table per forward)."""
        if (key, seq_len) not in self._tables:
            self._tables[key, seq_len] = self.rotary(positions, seq_len=seq_len)
        return self._tables[key, seq_len]

    def _rotate(self, x: Tensor, key: tuple, positions: Tensor, seq_len: int) -> Tensor:
        return apply_rotary(x, *self._table(key, positions, seq_len))

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, q_offset: int, q_pos: Tensor, k_pos: Tensor,
                 key_mask=None, scale: float | None = None, layer: int | None = None) -> Tensor:  # fmt: skip
        """q (B, H, T, hd) at slots q_offset.., positions q_pos (B, T); k, v (B, K, S, hd), positions k_pos
        (B|1, S) -> (B, H, T, hd). layer: which of the cache's layers k and v are (its stored rotations)."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        seq_len = int(k_pos.max()) + 1
        T, S = q.shape[2], k.shape[2]
        stored = self._stored(q, layer, q_offset, key_mask, S) and _slots(q_pos, k_pos, q_offset, key_mask)
        if stored and T == 1:
            out = self._decode_step(q, k, v, q_offset, scale, seq_len, layer)
            if out is not None:
                return out
        k, v = k.to(q.dtype), v.to(q.dtype)
        span = self.regions.span
        if int(q_pos.max()) < span and int(k_pos.max()) < span:
            # every pair in the first region, whose rotation is the model's own (positions below the
            # window or the first chunk): plain attention, exactly
            from longctx.attention import attention

            rq = self._rotate(q, ("plain q",), q_pos, seq_len)
            rk = self._rotate(k, ("plain k",), k_pos.expand(q.shape[0], S), seq_len)
            return attention(rq, rk, v, q_offset=q_offset, key_mask=key_mask, scale=scale)
        if _slots(q_pos, k_pos, q_offset, key_mask):
            if cpu_flash.supports(q, k, v):
                # decode steps without stored keys too (padded rows). `python bench/context_methods_speed.py
                # --model --lengths 8192 --decode 16`, 2-core AMD EPYC, ms per step: Self-Extend 1994 -> 252,
                # Dual Chunk 1013 -> 305 with this, the key spans and the tables (plain's fused step: 37)
                return self._fast(q, k, v, q_offset, key_mask, scale, seq_len, layer if stored else None)
            if T > 16 and _half_inference(q, k, v):
                if q.dtype == torch.bfloat16 and cpu_flash.bf16_layout_ok(q, k, v):
                    # bf16 inference where the bf16 kernels run: the region passes on them, each region's
                    # queries and keys rotated in fp32 and rounded once (`_fast_row`). SmolLM2 with
                    # Self-Extend, a 12000-token prefill, 2 Zen 5 cores: 35.9 s on the fp32 copies
                    # below, 16.9 s here (plain attention 13.9 s)
                    return self._fast(q, k, v, q_offset, key_mask, scale, seq_len).to(q.dtype)
                # bf16/fp16 inference: the region passes on fp32 copies (the dense path would take T x S
                # scores: 188 s for one 8192-token window of SmolLM2 in bf16 on a Zen 4 EPYC)
                out = self._fast(q.float(), k.float(), v.float(), q_offset, key_mask, scale, seq_len)
                return out.to(q.dtype)
        return self._dense(q, k, v, q_offset, q_pos, k_pos.expand(q.shape[0], S), key_mask, scale, seq_len)

    # dense: per-region scores for a block of queries over every key
    def _dense(self, q, k, v, q_offset, q_pos, k_pos, key_mask, scale, seq_len) -> Tensor:
        B, H, T, hd = q.shape
        Hk, S = k.shape[1], k.shape[2]
        G = H // Hk
        maps = self.regions.maps
        keys = [
            self._rotate(k, ("dense k", r), kmap(k_pos.to(torch.float32)), seq_len)
            for r, (_, kmap) in enumerate(maps)
        ]  # each (B, K, S, hd)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.empty_like(q)
        block = max(1, (1 << 24) // max(1, len(maps) * B * H * S))
        slots = torch.arange(S, device=q.device)
        for a in range(0, T, block):
            b_ = min(T, a + block)
            qp = q_pos[:, a:b_].to(torch.float32)
            region = self.regions.region(qp[:, :, None], k_pos[:, None, :].to(torch.float32))  # (B, t, S)
            scores = None
            for r, (qmap, _) in enumerate(maps):
                # a query group's G heads as rows of one product with their key head: a batched GEMM on
                # the keys as stored (broadcasting them over G copied them, per layer and region). With the
                # tables above, an fp32 decode step of SmolLM2 with Self-Extend at 8K on this path (where
                # such steps ran before they took the kernels'), 2-core AMD EPYC: 1.25-1.34 -> 0.37-0.45 s
                qr = self._rotate(q[:, :, a:b_], ("dense q", r, a, b_), qmap(qp), seq_len)
                qr = qr.reshape(B, Hk, G * (b_ - a), hd)
                s = (qr.to(acc) @ keys[r].to(acc).transpose(-1, -2)).view(B, H, b_ - a, S) * scale
                pick = (region == r)[:, None]
                scores = (
                    torch.where(pick, s, scores) if scores is not None else torch.where(pick, s, -math.inf)
                )
            visible = slots[None, :] <= (q_offset + torch.arange(a, b_, device=q.device))[:, None]  # causal
            allowed = visible[None]
            if key_mask is not None:
                mine = slots[None, :] == (q_offset + torch.arange(a, b_, device=q.device))[:, None]
                allowed = allowed & (key_mask.covering(S)[:, None, :] | mine[None])
            scores = scores.masked_fill(~allowed[:, None], -math.inf)
            p = torch.softmax(scores, dim=-1).view(B, Hk, G * (b_ - a), S)
            out[:, :, a:b_] = (p @ v.to(acc)).view(B, H, b_ - a, hd).to(q.dtype)
        return out

    # stored: each region's rotated keys kept in the KV cache, so a forward rotates only its new keys
    def _stored(self, q: Tensor, layer: int | None, q_offset: int, key_mask, S: int) -> bool:
        """Whether k and v are the cache's layer `layer` with this forward's keys last and no padding (rows of
        one length: each key's positions are its slot's), and fp32 queries on CPU."""
        c = self.cache
        return (
            c is not None and layer is not None and key_mask is None and q.dtype == torch.float32
            and q.device.type == "cpu" and q_offset == c.length and S == q_offset + q.shape[2]
        )  # fmt: skip

    def _keys(self, layer: int, r: int, k: Tensor, seq_len: int) -> Tensor:
        """Region r's rotated keys [0, S) of layer `layer` from the cache (rotating the slots it lacks)."""
        kmap = self.regions.maps[r][1]

        def rotate(raw: Tensor, a: int) -> Tensor:
            pos = torch.arange(a, a + raw.shape[2], dtype=torch.float32)[None]
            return self._rotate(raw.float(), ("stored k", r, a, raw.shape[2]), kmap(pos), seq_len)

        return self.cache.mapped_keys(layer, self._store_names[r], k, rotate)

    def _decode_ranges(self, slot: int) -> list[tuple[int, int, int]] | None:
        """For one query at `slot` over the keys [0, slot]: (region, a, b) for each region with keys, whose
        keys are the range [a, b) (every one visible); None if a region's keys are not one range (no method
        here makes such a region). The same for every layer of a forward, so computed once."""
        if ("ranges", slot) not in self._tables:
            qp, kp = torch.tensor([[[float(slot)]]]), torch.arange(slot + 1, dtype=torch.float32)[None, None]
            region = self.regions.region(qp, kp).flatten()  # (S,) each key's region
            ranges: list | None = []
            for r in range(len(self.regions.maps)):
                at = torch.nonzero(region == r).flatten()
                if len(at) and int(at[-1]) + 1 - int(at[0]) != len(at):
                    ranges = None
                    break
                if len(at):
                    ranges.append((r, int(at[0]), int(at[-1]) + 1))
            self._tables["ranges", slot] = ranges
        return self._tables["ranges", slot]

    def _decode_step(self, q, k, v, q_offset, scale, seq_len, layer) -> Tensor | None:
        """One query per row: each region is the native decode kernel's pass over its range of the stored
        rotated keys (16-bit caches read as stored), merged by logsumexp. None where the kernel cannot take
        these tensors. (`step_regions` hands the same to the fused step, which runs every layer in C.)"""
        from longctx.attention import cpu_decode

        ranges = self._decode_ranges(q_offset)
        if ranges is None:
            return None
        qpos = torch.tensor([[float(q_offset)]])
        parts = []
        for r, a, b in ranges:
            qr = self._rotate(q, ("q", r, q_offset, 1), self.regions.maps[r][0](qpos), seq_len)
            keys, values = self._keys(layer, r, k, seq_len)[:, :, a:b], v[:, :, a:b]
            if not cpu_decode.supports(qr, keys, values):
                return None
            lse = torch.empty(q.shape[:3])
            out = cpu_decode.decode_attention(qr, keys, values, scale=scale, lse=lse)
            parts.append((slice(0, 1), out, lse))
        return _merge(parts, q.shape)

    def step_regions(self, slot: int) -> StepRegions | None:
        """What a fused decode step needs to attend as this method does for a query at `slot` (see
        `StepRegions`); None where `_decode_ranges` is."""
        ranges = self._decode_ranges(slot)
        if ranges is None:
            return None
        names = list(dict.fromkeys(self._store_names))  # each store once, in region order
        pos = torch.tensor([[float(slot)]])
        q_rot = [self.rotary(self.regions.maps[r][0](pos), seq_len=slot + 1) for r, _, _ in ranges]
        first = [self._store_names.index(name) for name in names]  # a region that writes each store
        k_rot = [self.rotary(self.regions.maps[r][1](pos), seq_len=slot + 1) for r in first]

        def rows(tables, i):  # (n, rot) fp32
            return torch.cat([t[i].reshape(1, -1) for t in tables]).float().contiguous()

        return StepRegions(
            ranges=[(a, b) for _, a, b in ranges],
            stores=[names.index(self._store_names[r]) for r, _, _ in ranges],
            names=names,
            q_cos=rows(q_rot, 0), q_sin=rows(q_rot, 1), k_cos=rows(k_rot, 0), k_sin=rows(k_rot, 1),
        )  # fmt: skip

    # fast: region passes of the native kernel over key ranges, merged by logsumexp
    def _fast(self, q, k, v, q_offset, key_mask, scale, seq_len, layer=None) -> Tensor:
        """layer: take the rotated keys from the cache's store (see `_stored`) rather than rotate them."""
        starts = None if key_mask is None else key_mask.starts.tolist()
        if starts is None or not any(starts):
            return self._fast_row(q, k, v, q_offset, scale, seq_len, layer)
        # left padding: each row on its own keys (the pad prefix dropped, positions = slots again)
        return torch.cat(
            [
                self._fast_row(
                    q[b : b + 1], k[b : b + 1, :, s:], v[b : b + 1, :, s:], q_offset - s, scale, seq_len
                )
                for b, s in enumerate(starts)
            ],  # fmt: skip
            dim=0,
        )

    def _fast_row(self, q, k, v, q_offset, scale, seq_len, layer=None) -> Tensor:
        T, S = q.shape[2], k.shape[2]
        qpos = torch.arange(q_offset, q_offset + T, dtype=torch.float32, device=q.device)[None]
        kpos = torch.arange(S, dtype=torch.float32, device=q.device)[None]
        maps = self.regions.maps
        # rotated in fp32 (no-ops on fp32 q and k), then rounded once to q's dtype (bf16 on the bf16 kernels)
        rot_q = [
            self._rotate(q.float(), ("q", r, q_offset, T), m[0](qpos), seq_len).to(q.dtype)
            for r, m in enumerate(maps)
        ]
        spans = self._key_spans(q_offset, T, S)
        if layer is not None:
            rot_k = [
                (self._keys(layer, r, k, seq_len)[:, :, a:b].to(q.dtype), a) for r, (a, b) in enumerate(spans)
            ]
        else:
            # each region rotates only the keys its passes read, [a, b): a decode step rotates S keys, not
            # S per region (Dual Chunk's step at 8K on a 2-core AMD EPYC: 403 -> 305 ms; see __call__)
            rot_k = [
                (
                    self._rotate(k[:, :, a:b].float(), ("k", r, a, b), m[1](kpos[:, a:b]), seq_len).to(
                        q.dtype
                    ),
                    a,
                )
                for r, (m, (a, b)) in enumerate(zip(maps, spans))
            ]
        band = self.regions.kind == "band"
        parts = (self._band if band else self._chunks)(rot_q, rot_k, v, q_offset, scale)
        return _merge(parts, q.shape)

    def _key_spans(self, q_offset: int, T: int, S: int) -> list[tuple[int, int]]:
        """The keys [a, b) each region's passes read for queries at slots q_offset..q_offset + T - 1."""
        if self.regions.kind == "band":  # near: a window before the first query on; far: a window back
            w = self.regions.span  # (far is empty for a padded row wholly inside the window)
            return [(max(0, q_offset - w), S), (0, max(0, q_offset + T - w))]
        c = self.regions.span  # DCA: the queries' chunks, the chunk before each, every older one
        first, last = q_offset // c, (q_offset + T - 1) // c
        return [(first * c, S), (max(0, (first - 1) * c), last * c), (0, max(0, (last - 1) * c))]

    def _band(self, rq, rk, v, q_offset, scale) -> list:
        """near (region 0): keys within the window, normal rotation; far (region 1): keys w or more back.
        rk[r] = (region r's rotated keys, the slot of the first)."""
        (near, k0), (far, _) = rk
        w, T, e = self.regions.span, rq[0].shape[2], far.shape[2]
        parts = []
        if e:  # far: keys j <= s - w
            parts.append((slice(0, T), *_flash(rq[1], far, v[:, :, :e], True, q_offset - w, scale)))
        for a in range(0, T, w):
            M = min(w, T - a)
            s0 = q_offset + a  # the block's first query slot
            qn = rq[0][:, :, a : a + M]
            kn = near[:, :, s0 - k0 : s0 - k0 + M]
            parts.append((slice(a, a + M), *_flash(qn, kn, v[:, :, s0 : s0 + M], True, 0, scale)))
            lo = max(0, s0 - w)
            n = s0 - lo
            if n:  # keys [lo, s0) of row r visible when j > s0 + r - w: reversed, a causal pass
                c = s0 - w - lo
                kb = near[:, :, lo - k0 : s0 - k0]
                out, lse = _flash(qn.flip(2), kb.flip(2), v[:, :, lo:s0].flip(2), True, n - M - c - 1, scale)
                parts.append((slice(a, a + M), out.flip(2), lse.flip(2)))
        return parts

    def _chunks(self, rq, rk, v, q_offset, scale) -> list:
        """DCA: region 0 within the query's chunk, 1 the chunk before, 2 every older one. rk as in _band."""
        (k_in, o0), (k_prev, o1), (k_old, _) = rk
        c, T = self.regions.span, rq[0].shape[2]
        parts = []
        first, last = q_offset // c, (q_offset + T - 1) // c
        for chunk in range(first, last + 1):
            a = max(q_offset, chunk * c) - q_offset  # this chunk's query rows [a, b)
            b = min(q_offset + T, (chunk + 1) * c) - q_offset
            rows, k0 = slice(a, b), chunk * c
            parts.append((rows, *_flash(rq[0][:, :, rows], k_in[:, :, k0 - o0 : k0 - o0 + c], v[:, :, k0 : k0 + c],
                                         True, q_offset + a - k0, scale)))  # fmt: skip
            if chunk >= 1:
                p0 = k0 - c
                parts.append(
                    (
                        rows,
                        *_flash(
                            rq[1][:, :, rows],
                            k_prev[:, :, p0 - o1 : k0 - o1],
                            v[:, :, p0:k0],
                            False,
                            0,
                            scale,
                        ),
                    )
                )
            if chunk >= 2:
                e = k0 - c
                parts.append(
                    (rows, *_flash(rq[2][:, :, rows], k_old[:, :, :e], v[:, :, :e], False, 0, scale))
                )
        return parts


def _half_inference(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """bf16/fp16 without a gradient, in a layout the fp32 kernels take once copied to fp32."""
    return not (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    ) and cpu_flash.supports_on_copies(q, k, v)


def _slots(q_pos: Tensor, k_pos: Tensor, q_offset: int, key_mask) -> bool:
    """Positions are the slots (less each row's left padding): the fast path's assumption."""
    T, S = q_pos.shape[1], k_pos.shape[1]
    pad = 0 if key_mask is None or key_mask.starts is None else key_mask.starts[:, None]
    if key_mask is not None and key_mask.starts is None:
        return False
    want_q = (torch.arange(q_offset, q_offset + T, device=q_pos.device)[None] - pad).clamp_min(0)
    want_k = (torch.arange(S, device=k_pos.device)[None] - pad).clamp_min(0)
    return bool(torch.equal(q_pos.expand_as(want_q), want_q) and torch.equal(k_pos.expand_as(want_k), want_k))


def _flash(q, k, v, causal: bool, q_offset: int, scale: float) -> tuple[Tensor, Tensor]:
    kernel = cpu_flash.flash_attention_bf16 if q.dtype == torch.bfloat16 else cpu_flash.flash_attention_cpu
    out, lse = kernel(q, k, v, causal, q_offset, scale)  # any strides, rows whole
    return out, torch.where(torch.isposinf(lse), -math.inf, lse)  # the kernel marks rows with no key +inf


def _merge(parts: list, shape) -> Tensor:
    """Per query, the softmax over the union of the parts' (disjoint) key sets from each part's output and
    logsumexp: out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i lse_i."""
    B, H, T, hd = shape
    total = torch.full((B, H, T), -math.inf)
    for rows, _, lse in parts:
        total[:, :, rows] = torch.logaddexp(total[:, :, rows], lse)
    out = torch.zeros(B, H, T, hd)
    safe = torch.where(torch.isinf(total), 0.0, total)
    for rows, o, lse in parts:
        out[:, :, rows] += torch.exp(lse - safe[:, :, rows])[..., None].nan_to_num(0.0) * o
    return out


def method_spec(name: str, trained: int, factor: float | None = None, **given: Any) -> dict[str, Any]:
    """A `context_method` dict for `name` (hyphens or underscores) with defaults for what is not given:
    the papers' (window L/4; DCA chunk 3L/4, local window L/16) and, for Self-Extend's group and leaky
    ReRoPE's leak, the smallest that reaches `factor` x the trained length L."""
    name = name.replace("-", "_")
    if name not in METHODS:
        raise ConfigError(f"unknown context method {name!r}; choose one of {', '.join(METHODS)}")
    spec: dict[str, Any] = {"type": name, **{k: v for k, v in given.items() if v is not None}}
    factor = float(factor or 1.0)
    if factor != 1.0:
        spec.setdefault("factor", factor)
    if name in ("self_extend", "rerope", "leaky_rerope"):
        spec.setdefault("window", max(1, trained // 4))
        reach = max(1.0, (factor * trained - spec["window"]) / max(1, trained - spec["window"]))
        if name == "self_extend":
            spec.setdefault("group_size", max(1, math.ceil(reach)))
        elif name == "leaky_rerope":
            spec.setdefault("leak", max(1.0, reach))
    else:
        spec.setdefault("chunk_size", max(2, trained * 3 // 4))
        spec.setdefault("local_window", max(1, trained // 16))
    return spec


def method_names() -> list[str]:
    """The CLI spellings: self-extend, rerope, leaky-rerope, dual-chunk."""
    return [name.replace("_", "-") for name in METHODS]
