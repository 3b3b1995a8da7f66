"""Attention behind one call: `attention(q, k, v, ...)` picks a backend by name (or takes one).

Backends:
- `sdpa`       torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels where
               torch has them; with an explicit mask it falls back to the O(L^2) math path);
- `chunked`    exact attention with an online softmax over key blocks and a recomputing backward: O(L)
               memory on any device, same output and gradients as sdpa;
- `cpu_flash`  native FlashAttention forward/backward for fp32 on x86-64 CPUs (`longctx/kernels`);
- `cpu_decode` the native one-query kernel of a decode step over an fp32/fp16/bf16 KV cache;
- `auto`       picks among them per call (`dispatch.auto_backend`).
Ring attention (context parallel) and LongLoRA's S²-Attn are backend functions handed to one forward
through the model's forward context (`longctx.model.ForwardContext.attention`), never installed globally.
Padded rows reach every backend as a `KeyMask`.
"""

from longctx.attention.dispatch import BACKENDS, attention, register_backend
from longctx.attention.mask import KeyMask

__all__ = ["BACKENDS", "KeyMask", "attention", "register_backend"]
