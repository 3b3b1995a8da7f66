"""Ring attention: exact causal attention over a sequence split across the C ranks of a context-parallel group.

Each rank holds the queries, keys and values of its two zigzag chunks (`RingLayout`). The forward passes
the (k, v) block of every rank once around the ring with point-to-point sends (`batch_isend_irecv`; works
on gloo and NCCL), overlapping each transfer with the attention of the block already received, and merges
the per-block (out, lse) pairs with the online-softmax rule. The backward passes (k, v) around again, with
a dk/dv accumulator travelling one hop behind: every rank adds its share to the block it holds, and after C
hops each block's gradient arrives back at its owner. Memory per rank: the local activations (1/C of the
sequence) plus two (k, v) blocks in flight, never the whole sequence's keys.

The block math is the chunked backend's (`longctx.attention.chunked.block_forward/block_backward`). The
zigzag chunks are not contiguous, so each rank's queries and each received block are split into their two
contiguous chunks; a (query chunk, key chunk) pair is then either entirely in the future (skipped), on the
diagonal (q_offset 0), or entirely in the past (q_offset = distance between the chunk starts) — the causal
mask and ALiBi's distances both come out right in global token indices.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longctx.attention import register_backend
from longctx.attention.chunked import block_backward, block_forward
from longctx.errors import ConfigError


@dataclass(frozen=True)
class RingLayout:
    """Where this rank's tokens sit in the global sequence (zigzag: rank r holds chunks r and 2C-1-r)."""

    group: dist.ProcessGroup | None
    ranks: tuple[int, ...]  # global ranks of the context-parallel group, in ring order
    index: int  # this rank's place in the ring (its cp rank)
    chunk: int  # tokens per zigzag chunk: T / (2C)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def starts(self, owner: int) -> tuple[int, int]:
        """Global index of the first token of each of `owner`'s two chunks."""
        return owner * self.chunk, (2 * self.size - 1 - owner) * self.chunk


def _exchange(t: torch.Tensor, layout: RingLayout) -> tuple[torch.Tensor, list]:
    """Send `t` to the next rank and receive the previous rank's into a new buffer (asynchronous)."""
    buf = torch.empty_like(t)
    nxt = layout.ranks[(layout.index + 1) % layout.size]
    prv = layout.ranks[(layout.index - 1) % layout.size]
    ops = [dist.P2POp(dist.isend, t, nxt, layout.group), dist.P2POp(dist.irecv, buf, prv, layout.group)]
    return buf, dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _pairs(layout: RingLayout, owner: int, causal: bool):
    """(query half, key half, q_offset) for every pair of chunks that is not entirely masked."""
    n = layout.chunk
    for qi, qa in enumerate(layout.starts(layout.index)):
        for ki, kb in enumerate(layout.starts(owner)):
            if causal and kb > qa:
                continue  # chunks are aligned: a later key chunk is masked for every query in this chunk
            yield slice(qi * n, (qi + 1) * n), slice(ki * n, (ki + 1) * n), qa - kb


def _block_causal(causal: bool, q_offset: int, slopes) -> bool:
    # a past chunk is fully visible: skip building a mask of zeros (ALiBi still needs its distances)
    return causal and (q_offset == 0 or slopes is not None)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, slopes, scale: float, chunk_size: int, layout: RingLayout):
        B, Hq, T, hd = q.shape  # T = 2 * layout.chunk local tokens
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros(B, Hq, T, hd, device=q.device, dtype=acc)
        lse = torch.full((B, Hq, T), float("-inf"), device=q.device, dtype=acc)
        kv = torch.stack([k, v])  # (2, B, Hkv, T, hd): one message per hop
        for step in range(layout.size):
            owner = (layout.index - step) % layout.size
            pending = _exchange(kv, layout) if step < layout.size - 1 else None
            for qs, ks, off in _pairs(layout, owner, causal):
                o_b, lse_b = block_forward(
                    q[:, :, qs],
                    kv[0][:, :, ks],
                    kv[1][:, :, ks],
                    causal=_block_causal(causal, off, slopes),
                    q_offset=off,
                    slopes=slopes,
                    scale=scale,
                    chunk=chunk_size,
                )
                # online-softmax merge; step 0 holds every row's own diagonal, so lse is finite after it
                new = torch.logaddexp(lse[:, :, qs], lse_b)
                out[:, :, qs] = (
                    out[:, :, qs] * torch.exp(lse[:, :, qs] - new)[..., None]
                    + o_b * torch.exp(lse_b - new)[..., None]
                )
                lse[:, :, qs] = new
            if pending is not None:
                _wait(pending[1])
                kv = pending[0]
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, slopes if slopes is not None else torch.empty(0))
        ctx.cfg = (causal, slopes is not None, scale, chunk_size, layout)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, slopes = ctx.saved_tensors
        causal, has_slopes, scale, chunk_size, layout = ctx.cfg
        slopes = slopes if has_slopes else None
        acc = lse.dtype
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, device=q.device, dtype=acc)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, device=q.device, dtype=acc)  # gradient of the block held now
        for step in range(layout.size):
            owner = (layout.index - step) % layout.size
            pending = _exchange(kv, layout) if step < layout.size - 1 else None
            for qs, ks, off in _pairs(layout, owner, causal):
                dq_b, dk_b, dv_b = block_backward(
                    q[:, :, qs],
                    kv[0][:, :, ks],
                    kv[1][:, :, ks],
                    out[:, :, qs],
                    lse[:, :, qs],
                    dout[:, :, qs],
                    causal=_block_causal(causal, off, slopes),
                    q_offset=off,
                    slopes=slopes,
                    scale=scale,
                    chunk=chunk_size,
                )
                dq[:, :, qs] += dq_b
                dkv[0][:, :, ks] += dk_b
                dkv[1][:, :, ks] += dv_b
            if pending is not None:
                _wait(
                    pending[1]
                )  # finish the (k, v) hop before the dk/dv hop: one message per peer at a time
                kv = pending[0]
            # the accumulator follows its block one hop behind; after C hops it is back with its owner
            dkv_next, works = _exchange(dkv, layout)
            _wait(works)
            dkv = dkv_next
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(
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
    layout: RingLayout | None = None,
) -> torch.Tensor:
    """The `ring` attention backend: q (B, Hq, T, hd), k, v (B, Hkv, T, hd) for this rank's zigzag chunks.
    `layout` comes bound by `ring_backend` (a context-parallel step's batch carries it)."""
    if layout is None:
        raise ConfigError(
            "ring attention runs only inside a context-parallel step "
            "(`with setup.context(batch):` from longctx.parallel)"
        )
    if key_mask is not None:
        raise ConfigError("ring attention takes no padded rows (key mask); pack sequences without padding")
    if q_offset != 0 or k.shape[2] != q.shape[2]:
        raise ConfigError(
            "ring attention has no KV cache: it is for training and full-sequence scoring; "
            "generate outside the context-parallel step"
        )
    if dropout_p > 0.0:
        raise ConfigError("ring attention has no attention dropout; set dropout=0 for context parallel")
    if q.shape[2] != 2 * layout.chunk:
        raise ConfigError(f"ring attention got {q.shape[2]} local tokens, the layout says {2 * layout.chunk}")
    if q.shape[1] % k.shape[1]:
        raise ConfigError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return RingAttention.apply(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        bool(causal),
        alibi_slopes,
        scale,
        int(chunk_size),
        layout,
    )


def ring_backend(layout: RingLayout):
    """The backend function for one context-parallel step: ring attention over `layout`."""
    return functools.partial(ring_attention, layout=layout)


register_backend("ring", ring_attention)  # by name it only explains where it runs
