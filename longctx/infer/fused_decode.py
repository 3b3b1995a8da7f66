"""A decode step of every layer in one native call (`longctx/kernels/decode_step.c`), for the models it fits.

The per-op path (the model's own forward, with `decode_ops` routing its linears to the native kernels)
spends most of a small model's decode step in Python and torch dispatch: ~40 calls per layer. This path
gathers each layer's weights and cache pointers once into a plan and runs all layers in C, on fp32
activations; the embedding, the final norm and the head stay with the caller. It takes a step only where it
computes what the model would: a llama-style block exactly as `longctx.model` builds it (RMSNorm, RoPE or no
positions, SwiGLU, no ALiBi, biases allowed), plain or quantized linears
(`longctx.infer.quant`) in fp32/fp16/bf16 or ggml blocks, a KV cache storing fp32/fp16/bf16 keys already
rotated (not `rotate_on_read`), or int8 ones with a scale per token (`Int8KVCache`: the C side rounds the
new token's keys and values as its `quantize` does and reads the int8 values as they are, a quarter of
fp32's bytes), on CPU, without autograd. A context method (Self-Extend, ReRoPE, Dual Chunk...) runs here
too once the cache keeps its rotated keys (`KVCache.mapped_keys`, filled by the prefill; float caches, rows
of one length): each region a decode pass over its range of keys, merged by logsumexp. Anything else —
LoRA or prefix-tuned layers, dynamic RoPE, GPU — runs the per-op path. `supports` says which, and `why_not`
why.

The plan holds references to the weights it points at and is rebuilt when any of them moved (the model
was cast or reloaded), so it never reads freed memory.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from longctx.attention.context_methods import ContextAttention
from longctx.infer.cache import Int8KVCache, KVCache
from longctx.infer.quant import QuantizedLinear
from longctx.kernels import available, library
from longctx.model import GPT, MLP, Attention, Block, RMSNorm

_W = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_KV = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}
_Q_BASE = 10


class LcMat(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("w", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64)]  # fmt: skip


class LcLayer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                *[(name, LcMat) for name in ("q", "k", "v", "o", "gate", "up", "down")],
                ("kc", ctypes.c_void_p), ("vc", ctypes.c_void_p), ("ks", ctypes.c_void_p),
                ("vs", ctypes.c_void_p)]  # fmt: skip


class LcDims(ctypes.Structure):
    _fields_ = [*[(n, ctypes.c_int64) for n in ("n_layer", "d", "H", "KV", "hd", "rot", "ff", "bstride",
                                                "hstride", "kv_kind")], ("eps", ctypes.c_float)]  # fmt: skip


class LcRegions(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("n_store", ctypes.c_int64),
                *[(n, ctypes.c_void_p) for n in ("a", "b", "store", "qcos", "qsin", "kcos", "ksin", "stores")]]  # fmt: skip


def _model_reason(model: GPT) -> str | None:
    """Why this model's layers cannot run fused (None: they can)."""
    c = model.config
    if not available():
        return "no native kernels"
    if c.position not in ("rope", "none"):
        return f"positions {c.position}"
    if c.context_method is not None and model.positions.length_dependent:
        return f"{c.context_method['type']} over length-dependent RoPE"
    if c.norm != "rmsnorm" or c.mlp != "swiglu" or not c.causal:
        return f"{c.norm} / {c.mlp} blocks"
    if c.head_dim % 8:
        return f"head dim {c.head_dim} is not a multiple of 8"
    if model.head_weight.device.type != "cpu":
        return "not on CPU"
    for block in model.blocks:
        if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not MLP:
            return "a block is wrapped (LoRA, prefix tuning, checkpointing)"
        if type(block.attn_norm) is not RMSNorm or type(block.mlp_norm) is not RMSNorm:
            return "a norm is not the model's RMSNorm"
        for m in _linears(block):
            if type(m) is QuantizedLinear:
                continue
            if type(m) is not nn.Linear or m.weight.dtype not in _W:
                kind = type(m)
                return f"a linear layer is {kind.__module__}.{kind.__qualname__} (an adapter or wrapper)"
    return None


def _linears(block: Block) -> list[nn.Module]:
    a, m = block.attn, block.mlp
    return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]


def _mat(m: nn.Module) -> tuple[LcMat, list[torch.Tensor]]:
    bias = m.bias.detach().float().contiguous() if m.bias is not None else None  # a copy when 16-bit
    if type(m) is QuantizedLinear and m.fallback is None:
        w, kind, (n, k) = m.blocks, _Q_BASE + m.kind, (m.out_features, m.in_features)
    else:
        w = m.fallback if type(m) is QuantizedLinear else m.weight.detach()
        w = w.contiguous()
        kind, (n, k) = _W[w.dtype], w.shape
    keep = [t for t in (w, bias) if t is not None]
    return LcMat(kind, w.data_ptr(), None if bias is None else bias.data_ptr(), n, k), keep


class Plan:
    """The layers' weights as the C side reads them, for one model (or why it cannot have them)."""

    def __init__(self, model: GPT):
        c = model.config
        self.watch = _watch(model)
        self.reason = _model_reason(model)
        self.keep: list[torch.Tensor] = []  # every tensor a pointer refers to: alive as long as the plan
        self.rot = c.rotary_dim if c.position == "rope" else 0
        self.work = torch.empty(0)
        if self.reason is not None:
            return
        self.layers = (LcLayer * c.n_layer)()
        for i, block in enumerate(model.blocks):
            mats = []
            for m in _linears(block):
                mat, keep = _mat(m)
                mats.append(mat)
                self.keep += keep
            # fp32 (copies when the model is 16-bit: exact, and activations are fp32 here)
            norms = [n.weight.detach().float().contiguous() for n in (block.attn_norm, block.mlp_norm)]
            self.keep += norms
            self.layers[i] = LcLayer(norms[0].data_ptr(), norms[1].data_ptr(), *mats, None, None, None, None)

    def valid(self) -> bool:
        """Whether the model still holds the very modules and tensors (at the same addresses) the plan was
        built from: a few thousand dict lookups (~0.2 ms for 30 layers), where rebuilding costs ~2 ms."""
        objects, tensors = self.watch
        return all(d.get(k) is o for d, k, o in objects) and all(t.data_ptr() == p for t, p in tensors)


def _watch(model: GPT):
    """What a plan depends on: every child, parameter and buffer entry under the blocks as (container
    dict, key, object), and every tensor's address. A cast moves the tensors; LoRA, quantization or a
    wrapper replaces entries."""
    objects, tensors = [], []
    for m in model.blocks.modules():
        for store in (m._modules, m._parameters, m._buffers):
            for key, obj in store.items():
                objects.append((store, key, obj))
                if isinstance(obj, torch.Tensor):
                    tensors.append((obj, obj.data_ptr()))
    return objects, tensors


def why_not(model: GPT, cache) -> str | None:
    """Why this step cannot run fused (None: it can)."""
    if torch.is_grad_enabled() and model.head_weight.requires_grad:
        return "autograd is on"
    if model.training:
        return "the model is in training mode"
    reason = _plan(model).reason
    if reason is not None:
        return reason
    if type(cache) not in (KVCache, Int8KVCache):
        return f"a {type(cache).__name__}"
    if cache.rotate_on_read:
        return "the cache keeps keys un-rotated"
    k, v, scales = _storage(cache)
    if k.dtype not in _KV or not all(t.is_contiguous() for t in (k, v, *scales)):
        return "cache layout"
    if model.config.context_method is not None:
        return _method_reason(model, cache)
    return None


def _method(model: GPT, cache: KVCache) -> ContextAttention:
    c = model.config
    return ContextAttention(c.context_method, model.positions.rotary, c.max_seq_len, cache=cache)


def _method_reason(model: GPT, cache: KVCache) -> str | None:
    """A context method's step runs fused over the rotated keys the cache keeps for it (`mapped_keys`,
    filled by the forwards before), in the cache's float layout, rows of one length."""
    if isinstance(cache, Int8KVCache) or cache.pad is not None:
        return "an int8 cache" if isinstance(cache, Int8KVCache) else "padded rows"
    regions = _method(model, cache).step_regions(cache.length)
    if regions is None:
        return "a region whose keys are not one range"
    for name in regions.names:
        store = cache.key_store(name)
        if store is None or any(n != cache.length for n in store[1]):
            return "the rotated keys are not stored up to this step"  # the per-op step stores them
    return None


def _storage(cache: KVCache) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The tensors the C side writes and reads: keys, values (L, B, K, S, hd) and, for int8, their scales."""
    if isinstance(cache, Int8KVCache):
        return cache.kq, cache.vq, (cache.ks, cache.vs)
    return cache.k, cache.v, ()


def supports(model: GPT, cache) -> bool:
    return why_not(model, cache) is None


def _plan(model: GPT) -> Plan:
    plan = model.__dict__.get("_longctx_fused_plan")
    if plan is None or not plan.valid():
        plan = Plan(model)
        model._longctx_fused_plan = plan  # set from outside, as decode_ops does: model.py never reads it
    return plan


@torch.no_grad()
def step(model: GPT, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
    """One decode step: ids (B, 1) appended to `cache` -> final hidden states (B, 1, d). The caller checks
    `supports` and has reserved the slot (`cache.reserve(1)`)."""
    c, plan = model.config, _plan(model)
    B, slot = ids.shape[0], cache.length
    position_ids = cache.key_positions(slot + 1)[:, -1:].expand(B, 1)  # (B, 1)
    x = model.positions.embed(model.tok_emb(ids), position_ids)[:, 0].float().contiguous()  # (B, d)
    if plan.rot and c.context_method is None:
        cos, sin = model.positions.rotary(position_ids)  # (B, 1, rot)
        cos, sin = cos[:, 0].float().contiguous(), sin[:, 0].float().contiguous()
    k, v, scales = _storage(cache)  # (L, B, K, S, hd), and an int8 cache's (L, B, K, S, 1) scales
    esize = k.element_size()
    for i in range(c.n_layer):
        plan.layers[i].kc = k.data_ptr() + i * k.stride(0) * esize
        plan.layers[i].vc = v.data_ptr() + i * v.stride(0) * esize
        layer = plan.layers[i]
        layer.ks, layer.vs = (t.data_ptr() + i * t.stride(0) * 4 for t in scales) if scales else (None, None)
    dims = LcDims(c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.head_dim, plan.rot, c.d_ff, k.stride(1),
                  k.stride(2), _KV[k.dtype], c.norm_eps)  # fmt: skip
    need = B * (2 * c.d_model + 2 * c.n_head * c.head_dim + 2 * c.n_kv_head * c.head_dim + 2 * c.d_ff)
    need += B * c.n_head * (slot + 1)
    regions, keep, stores = None, [], []
    if c.context_method is not None:
        regions, keep, stores = _regions(model, cache, slot)
        need += regions.n * B * c.n_head * (c.head_dim + 1) + B * (c.n_head + c.n_kv_head) * c.head_dim
    if plan.work.numel() < need:
        plan.work = torch.empty(max(need, 2 * plan.work.numel()))
    starts = None if cache.pad is None else cache.pad.to(torch.int64).contiguous()
    library().lc_decode_layers(
        ctypes.byref(dims), plan.layers, x.data_ptr(), B,
        cos.data_ptr() if plan.rot and regions is None else None,
        sin.data_ptr() if plan.rot and regions is None else None, slot,
        None if starts is None else starts.data_ptr(), None if regions is None else ctypes.byref(regions),
        plan.work.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    for _, mapped in stores:
        mapped[:] = [slot + 1] * len(mapped)  # the C side wrote the new key into every layer of each
    cache.advance(1)
    return model.norm(x.to(model.head_weight.dtype))[:, None]


def _regions(model: GPT, cache: KVCache, slot: int):
    """The context method's regions for the query at `slot` as the C side reads them -> (LcRegions, the
    tensors it points into, the key stores)."""
    r = _method(model, cache).step_regions(slot)
    stores = [cache.key_store(name) for name in r.names]
    ranges = torch.tensor(r.ranges, dtype=torch.int64)
    keep = [ranges[:, 0].contiguous(), ranges[:, 1].contiguous(), torch.tensor(r.stores, dtype=torch.int64),
            r.q_cos, r.q_sin, r.k_cos, r.k_sin]  # fmt: skip
    L, size = model.config.n_layer, stores[0][0].element_size()
    pointers = (ctypes.c_void_p * (len(stores) * L))(
        *[t.data_ptr() + i * t.stride(0) * size for t, _ in stores for i in range(L)]
    )
    keep.append(pointers)
    regions = LcRegions(
        len(r.ranges), len(stores), *[t.data_ptr() for t in keep[:7]], ctypes.addressof(pointers)
    )
    return regions, keep, stores
