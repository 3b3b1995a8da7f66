"""The decoder, top to bottom: norm -> positions -> attention -> MLP -> block -> GPT.

Shapes: B batch, T tokens in this call, S tokens the keys cover (T plus a KV cache), d model width,
H query heads, K key/value heads (H % K == 0), hd head dim, V vocab.

The model knows nothing of parallelism, LoRA or activation checkpointing: those wrap it from outside
(`longctx.parallel`, `longctx.extend`, `longctx.train.memory`). Positions are always explicit
(`position_ids`), so RoPE stays right when a sequence is split across ranks or packed from documents.
Everything a layer needs besides its input — rotations, the KV cache, the key mask of padded rows, an
attention function handed in from outside — is one `ForwardContext`, built once per forward in
`GPT.hidden_states` and passed down as one argument: no global state, so concurrent forwards (the server's
requests, a training step and an evaluation) cannot see each other's settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from longctx.attention import KeyMask, attention
from longctx.attention.context_methods import ContextAttention
from longctx.config import GPTConfig
from longctx.kernels.fused import rms_norm, swiglu
from longctx.positions import build_positions
from longctx.positions.rope import apply_rotary

Rotation = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (B, T, rotary_dim)


@dataclass(frozen=True)
class ForwardContext:
    """What every layer of one forward shares. rope: rotations of this call's tokens (None without RoPE);
    key_rope: rotations of every key, when the cache keeps keys un-rotated (`KVCache.rotate_on_read`);
    position_ids (B, T) and key_positions (B|1, S): the positions themselves, for methods that rotate by
    their own rule; key_mask: padded rows; attention: a backend (name or function) that takes every call
    of this forward instead of the layers' own (`Attention.backend`: ring attention, S²-Attn)."""

    position_ids: torch.Tensor
    rope: Rotation | None = None
    key_rope: Rotation | None = None
    key_positions: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    cache: Any = None  # longctx.infer.KVCache
    key_mask: KeyMask | None = None
    attention: str | Callable[..., torch.Tensor] | None = None
    # a training-free context method (`config.context_method`): it takes q and k un-rotated and rotates
    # them itself, region by region (longctx.attention.context_methods)
    method: Callable[..., torch.Tensor] | None = None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, same state dict) computed by `longctx.kernels.fused.rms_norm`: on CPU in
    fp32 one pass over memory each way instead of torch's chain of ~8 elementwise kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def build_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        # the attention backend of this layer's calls (a registered name, "auto"): set from outside where a
        # model runs another arithmetic (quantized weights' bf16 prefill: longctx.infer.quant)
        self.backend = config.attn_backend
        H, K, hd, d = config.n_head, config.n_kv_head, config.head_dim, config.d_model
        qkv_bias = config.bias or config.qkv_bias
        self.q_proj = nn.Linear(d, H * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, K * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, K * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(H * hd, d, bias=config.bias)

    def qkv(self, x: torch.Tensor, ctx: ForwardContext):
        """Project, rotate and (with a cache) append: -> q (B, H, T, hd), k, v (B, K, S, hd), q_offset.

        Split from `forward` so wrappers from outside (prefix tuning) can add keys without copying this."""
        B, T, _ = x.shape
        c, rope, cache = self.config, ctx.rope, ctx.cache  # rope None: positions rotate elsewhere
        q = self.q_proj(x).view(B, T, c.n_head, c.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)  # (B, K, T, hd)
        if rope is not None:
            q = apply_rotary(q, *rope)
        if cache is None:
            return q, (apply_rotary(k, *rope) if rope is not None else k), v, 0
        q_offset = cache.length
        if ctx.key_rope is not None:
            # the cache keeps keys un-rotated (length-dependent RoPE, or positions re-assigned in a
            # streaming window): rotate every cached key with the frequencies of *this* call
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, hd)
            return q, apply_rotary(k, *ctx.key_rope), v, q_offset
        if rope is not None:
            k = apply_rotary(k, *rope)
        k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, hd)
        return q, k, v, q_offset

    def attend(self, q, k, v, q_offset: int, ctx: ForwardContext) -> torch.Tensor:
        """(B, H, T, hd) queries over (B, K, S, hd) keys/values -> output projection (B, T, d)."""
        c = self.config
        B, _, T, _ = q.shape
        if ctx.method is not None:
            y = ctx.method(q, k, v, q_offset=q_offset, q_pos=ctx.position_ids, k_pos=ctx.key_positions,
                           key_mask=ctx.key_mask, layer=self.layer_idx)  # fmt: skip
            return self.o_proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim))
        y = attention(
            q,
            k,
            v,
            causal=c.causal,
            q_offset=q_offset,
            alibi_slopes=ctx.alibi_slopes,
            key_mask=ctx.key_mask,
            backend=ctx.attention or self.backend,
            chunk_size=c.attn_chunk_size,
            dropout_p=c.dropout if self.training else 0.0,
        )  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim))

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v, q_offset = self.qkv(x, ctx)
        return self.attend(q, k, v, q_offset, ctx)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        d, f, b = config.d_model, config.d_ff, config.bias
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(d, f, bias=b)
        self.up_proj = nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        if self.swiglu:
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))  # silu(gate) * up
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = build_norm(config)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = build_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    # the two residual branches are separate methods so memory tools can wrap each from outside
    # (checkpoint the attention branch, run the token-wise MLP branch in tiles: longctx.train.memory)
    def attn_branch(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.dropout(self.attn(self.attn_norm(x), ctx))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d), token by token
        return self.dropout(self.mlp(self.mlp_norm(x)))

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.attn_branch(x, ctx)
        return x + self.mlp_branch(x)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = build_positions(config)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = build_norm(config)
        self.lm_head = (
            None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if "norm" in name and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                # residual projections scaled down by depth (GPT-2) so the residual stream stays O(1)
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                p.normal_(0.0, std)

    @property
    def head_weight(self) -> torch.Tensor:
        """(V, d): the LM head's weight (the embedding when tied). The chunked loss uses it directly."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def context(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache=None,
        key_mask: KeyMask | None = None,
        attention: str | Callable[..., torch.Tensor] | None = None,
    ) -> ForwardContext:
        """The ForwardContext of one forward over input_ids (B, T).

        position_ids default to 0..T-1 after any cached tokens; a cache with padded rows gives each row its
        own positions (slot - pad) and the key mask of its padding."""
        B, T = input_ids.shape
        start = 0 if cache is None else cache.length
        key_positions = None
        if cache is not None:
            key_positions = cache.key_positions(start + T)  # (B|1, S)
            if position_ids is None:
                position_ids = key_positions[:, start:].expand(B, T)
            if cache.pad is not None:
                key_mask = KeyMask.from_padding(cache.pad, start + T)
        elif position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        key_rope, method = None, None
        if self.config.context_method is not None:  # q and k stay un-rotated: the method rotates them
            method = ContextAttention(
                self.config.context_method, self.positions.rotary, self.config.max_seq_len,
                cache=None if self.positions.length_dependent else cache,
            )  # fmt: skip
            rope = None
            if key_positions is None:
                key_positions = position_ids
        elif cache is not None and cache.rotate_on_read and self.config.position == "rope":
            total = int(key_positions.max()) + 1
            rope = self.positions.rotary(position_ids, seq_len=total)
            key_rope = self.positions.rotary(key_positions, seq_len=total)
        else:
            rope = self.positions.rotary(position_ids)
        return ForwardContext(
            position_ids=position_ids,
            rope=rope,
            key_rope=key_rope,
            key_positions=key_positions,
            alibi_slopes=self.positions.alibi_slopes,
            cache=cache,
            key_mask=key_mask,
            attention=attention,
            method=method,
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache=None,
        key_mask: KeyMask | None = None,
        attention: str | Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """input_ids: (B, T) -> final-normed hidden states (B, T, d).

        With a `cache` (longctx.infer.KVCache), new keys/values are appended to it. key_mask: padded rows
        (a `KeyMask`); attention: a backend for every layer of this forward (see ForwardContext)."""
        ctx = self.context(input_ids, position_ids, cache, key_mask, attention)
        x = self.emb_dropout(self.positions.embed(self.tok_emb(input_ids), ctx.position_ids))  # (B, T, d)
        for block in self.blocks:
            x = block(x, ctx)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, V)."""
        return F.linear(hidden, self.head_weight)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, cache=None
    ) -> torch.Tensor:
        """(B, T) -> logits (B, T, V). For long sequences prefer `hidden_states` + the chunked loss."""
        return self.logits(self.hidden_states(input_ids, position_ids, cache))
