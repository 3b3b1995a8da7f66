"""LongLoRA's shifted sparse attention (S²-Attn; Chen et al., 2024) as an attention backend.

Training only: the sequence is cut into groups of `group_ratio` of its length (1/4 by default) and each
group attends causally within itself; half of the heads use groups shifted by half a group, so neighbouring
groups exchange information through them. Cost per layer: O(T * g) instead of O(T^2). At inference (no
gradient: evaluation, generation, or a KV cache) it runs full attention, as LongLoRA does.

Two shift variants:
- `partition` (default): the shifted heads' groups are [0, g/2), [g/2, 3g/2), ..., [T-g/2, T) — what
  LongLoRA's flash-attention code does with `cu_seqlens`; no token sees a later one.
- `roll`: the paper's pseudo-code (`roll(-g/2)` of half the heads, grouped attention, roll back). Its last
  group wraps around, so the first g/2 tokens of those heads see the last g/2 (LongLoRA issues #15, #90).

The model never knows: `s2_backend()` is a backend function that the extension's training objective hands
to every forward (`ForwardContext.attention`); it is also registered by name, `attn_backend="s2"`. Grouped-query attention is kept when the key heads split evenly in two;
otherwise the key/value heads are repeated first (as LongLoRA's `repeat_kv`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from longctx.attention import register_backend
from longctx.attention.sdpa import sdpa_attention
from longctx.errors import ConfigError

S2_BACKEND = "s2"
SHIFT_MODES = ("partition", "roll")
DEFAULT_GROUP_RATIO = 0.25


def group_size(seq_len: int, group_ratio: float) -> int:
    g = int(seq_len * group_ratio)
    if g <= 1 or seq_len % g or (g % 2 and g != seq_len):
        raise ConfigError(
            f"S²-Attn needs the training length ({seq_len}) to be a multiple of an even group "
            f"size (here {g} = {group_ratio} x length); use a --seq-len divisible by "
            f"{2 * round(1 / group_ratio)}"
        )
    return g


def _grouped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: int, scale, dropout_p: float
) -> torch.Tensor:
    """Causal attention inside consecutive groups of g tokens. q: (B, H, T, hd), k/v: (B, K, T, hd),
    T a multiple of g -> (B, H, T, hd)."""
    B, H, T, hd = q.shape
    K, n = k.shape[1], T // g

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, h, T, hd) -> (B*n, h, g, hd)
        return x.view(B, x.shape[1], n, g, hd).transpose(1, 2).reshape(B * n, x.shape[1], g, hd)

    y = F.scaled_dot_product_attention(
        split(q), split(k), split(v), is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=H != K
    )  # (B*n, H, g, hd)
    return y.view(B, n, H, g, hd).transpose(1, 2).reshape(B, H, T, hd)


def _shifted_partition(q, k, v, g: int, scale, dropout_p: float) -> torch.Tensor:
    """Groups [0, g/2), [g/2, 3g/2), ..., [T-g/2, T): the full groups in the middle, the two half groups at
    the ends batched together."""
    h = g // 2
    T = q.shape[2]
    mid = (
        _grouped(q[:, :, h : T - h], k[:, :, h : T - h], v[:, :, h : T - h], g, scale, dropout_p)
        if T > g
        else None
    )
    ends = [torch.cat([x[:, :, :h], x[:, :, T - h :]], dim=2) for x in (q, k, v)]  # (B, ., 2h, hd)
    y_ends = _grouped(*ends, h, scale, dropout_p)
    parts = [y_ends[:, :, :h]] + ([mid] if mid is not None else []) + [y_ends[:, :, h:]]
    return torch.cat(parts, dim=2)


def _shifted_roll(q, k, v, g: int, scale, dropout_p: float) -> torch.Tensor:
    h = g // 2
    rolled = [x.roll(-h, dims=2) for x in (q, k, v)]
    return _grouped(*rolled, g, scale, dropout_p).roll(h, dims=2)


def s2_attention(
    q,
    k,
    v,
    *,
    causal=True,
    q_offset=0,
    alibi_slopes=None,
    key_mask=None,
    scale=None,
    dropout_p=0.0,
    chunk_size=256,
    group_ratio: float = DEFAULT_GROUP_RATIO,
    shift: str = "partition",
) -> torch.Tensor:
    """The backend: (B, H, T, hd) x (B, K, T, hd) -> (B, H, T, hd)."""
    Tq, Tk = q.shape[2], k.shape[2]
    if not torch.is_grad_enabled() or q_offset != 0 or Tq != Tk or key_mask is not None:
        # inference, or a KV cache: full attention, as LongLoRA evaluates
        return sdpa_attention(
            q,
            k,
            v,
            causal=causal,
            q_offset=q_offset,
            alibi_slopes=alibi_slopes,
            key_mask=key_mask,
            scale=scale,
            dropout_p=dropout_p,
        )
    if not causal or alibi_slopes is not None:
        raise ConfigError(
            "S²-Attn is for causal models without ALiBi (it groups a causal sequence); "
            "train without --s2-attn"
        )
    if shift not in SHIFT_MODES:
        raise ConfigError(f"unknown S²-Attn shift {shift!r}; choose one of {', '.join(SHIFT_MODES)}")
    g = group_size(Tq, group_ratio)
    if g == Tq:  # one group: nothing to shift between, so it is plain causal attention
        return sdpa_attention(q, k, v, causal=True, scale=scale, dropout_p=dropout_p)
    H, K = q.shape[1], k.shape[1]
    if K % 2:  # the shifted key heads must be exactly those of the shifted query heads
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        K = H
    hq, hk = H // 2, K // 2
    plain = _grouped(q[:, :hq], k[:, :hk], v[:, :hk], g, scale, dropout_p)
    shifted_fn = _shifted_partition if shift == "partition" else _shifted_roll
    shifted = shifted_fn(q[:, hq:], k[:, hk:], v[:, hk:], g, scale, dropout_p)
    return torch.cat([plain, shifted], dim=1)


register_backend(S2_BACKEND, s2_attention)


def s2_backend(group_ratio: float = DEFAULT_GROUP_RATIO, shift: str = "partition"):
    """The backend function for a forward: S²-Attn with these settings (full attention without grad)."""
    if not 0 < group_ratio <= 1:
        raise ConfigError(f"S²-Attn group ratio must be in (0, 1], got {group_ratio}")
    if shift not in SHIFT_MODES:
        raise ConfigError(f"unknown S²-Attn shift {shift!r}; choose one of {', '.join(SHIFT_MODES)}")
    return functools.partial(s2_attention, group_ratio=group_ratio, shift=shift)
