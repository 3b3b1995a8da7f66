"""A prompt cache: the KV states of recent prompts, kept so that a later prompt sharing a prefix with one
of them (a multi-turn chat over one document, a repeated system prompt, an evaluation's haystack before its
needle) prefills only what differs.

    cache = PromptCache(max_bytes=2 << 30, block=512)      # the engine makes one from EngineSpec
    n, entry = cache.lookup(prompt_ids)                    # entry's first n tokens are reusable
    kv.load_row(row, slot, entry.states, n)                # -> the KV cache, then prefill prompt[n:]
    cache.store(prompt_ids[:m], lambda: kv.row_states(row, slot, m))   # after prefill

Exactness. Prefill runs in chunks of `block` tokens from the prompt's first token, and reuse is cut to a
multiple of `block`: the reused states are then computed by the very same chunked forwards a fresh prefill
would run, and the rest is prefilled on the same chunk boundaries — the logits are bit for bit those of an
uncached run (tests/infer/test_prompt_cache.py). Only prompts' states are kept (what decoding appended was
computed one token at a time, so it would not be bit-identical to a prefill of the same tokens).

Memory: at most `max_bytes` of states; the least recently used entries go first. An entry that another
one extends (the next turn of a chat) is replaced by the longer one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Entry:
    ids: torch.Tensor  # (n,) long: the prompt tokens whose states are kept
    states: dict[str, torch.Tensor]  # the KV cache's slot tensors for this row: (layers, heads, n, ...)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.states.values())


class PromptCache:
    def __init__(self, max_bytes: int, block: int):
        self.max_bytes, self.block = max_bytes, block
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # id -> entry, least recently used first
        self._next = 0
        self.nbytes = 0  # kept as a count: the server's /health reads it while the worker stores
        self.lookups = self.hits = 0
        self.reused_tokens = self.prompt_tokens = 0

    def lookup(self, ids: list[int]) -> tuple[int, Entry | None]:
        """-> (n, entry): the entry whose first n tokens equal the prompt's, n the largest multiple of
        `block` below the prompt's length (the last token is always run: its logits start decoding)."""
        self.lookups += 1
        self.prompt_tokens += len(ids)
        limit = (len(ids) - 1) // self.block * self.block
        best, best_key = 0, None
        if limit > 0:
            prompt = torch.tensor(ids[:limit])
            for key, e in self.entries.items():
                n = _common_prefix(prompt, e.ids) // self.block * self.block
                if n > best:
                    best, best_key = n, key
        if best_key is None:
            return 0, None
        self.entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        return best, self.entries[best_key]

    def storable(self, n_tokens: int) -> int:
        """How many of a prompt's tokens an entry keeps: whole blocks, never the last token."""
        return (n_tokens - 1) // self.block * self.block

    def store(self, ids: list[int], states: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Keep the states of the tokens `ids`; `states()` copies them out of the KV cache (the row's slot
        tensors for those tokens), called only when no entry holds them already."""
        if not ids or self.max_bytes <= 0:
            return
        new = torch.tensor(ids)
        for key, e in list(self.entries.items()):
            if len(e.ids) >= len(new) and _common_prefix(new, e.ids) == len(new):  # already kept
                self.entries.move_to_end(key)
                return
        entry = Entry(new, states())
        if entry.nbytes > self.max_bytes:
            return
        for key, e in list(self.entries.items()):
            if _common_prefix(new, e.ids) == len(e.ids):  # the new entry extends this one: replace it
                self._drop(key)
        self.entries[self._next] = entry
        self.nbytes += entry.nbytes
        self._next += 1
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    def stats(self) -> dict:
        return {
            "entries": len(self.entries),
            "bytes": self.nbytes,
            "max_bytes": self.max_bytes,
            "lookups": self.lookups,
            "hits": self.hits,
            "hit_rate": self.hits / self.lookups if self.lookups else 0.0,
            "reused_tokens": self.reused_tokens,
            "prompt_tokens": self.prompt_tokens,
            "reused_fraction": self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
        }


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D token tensors."""
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if len(diff) else n
