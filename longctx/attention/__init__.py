"""Attention behind one call: `attention(q, k, v, ...)` picks a backend by name.

Backends:
- `sdpa`    torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels where torch
            has them; with an explicit mask it falls back to the O(L^2) math path);
- `chunked` exact attention with an online softmax over key blocks and a recomputing backward:
            O(L) memory on any device, same output and gradients as sdpa;
- `auto`    sdpa when it can run without a materialised mask, chunked otherwise.
Ring attention (context parallel) and LongLoRA's S²-Attn wrap these from outside (`longctx.parallel`,
`longctx.extend.s2attn`) by installing an override with `use_backend`.
"""

from longctx.attention.dispatch import BACKENDS, attention, register_backend, use_backend

__all__ = ["BACKENDS", "attention", "register_backend", "use_backend"]
