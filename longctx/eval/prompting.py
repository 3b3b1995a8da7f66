"""What the generation benchmarks (passkey, niah, ruler) share: sizing a prompt to a token budget with the
model's own tokenizer, a reproducible random stream per test cell, and reading the model's greedy answer."""

from __future__ import annotations

import random
from collections.abc import Callable

from longctx.data.tokenizer import Tokenizer
from longctx.errors import ConfigError
from longctx.model import GPT


def largest_fitting(
    n_tokens: Callable[[int], int], budget: int, *, lo: int = 0, hint: int = 1024, what: str = "prompt"
) -> int:
    """The largest size n >= lo with n_tokens(n) <= budget (n_tokens is non-decreasing in n).

    A binary search, as RULER sizes its haystacks: the upper end is found by doubling from `hint`, so
    the caller need not know how many characters/words a token is worth in this tokenizer."""
    if n_tokens(lo) > budget:
        raise ConfigError(
            f"the {what} does not fit in {budget} tokens even with an empty haystack "
            f"({n_tokens(lo)} tokens); ask for a longer length"
        )
    hi = max(hint, lo + 1)
    while n_tokens(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: n_tokens(lo) <= budget < n_tokens(hi)
        mid = (lo + hi) // 2
        if n_tokens(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def cell_rng(*parts: object) -> random.Random:
    """A random stream fixed by (seed, task, length, depth, trial, ...): every cell of a sweep is
    reproducible on its own, whatever else the sweep contains. (`random.Random(str)` hashes the string
    with SHA-512, so it does not depend on PYTHONHASHSEED.)"""
    return random.Random(":".join(str(p) for p in parts))


class GreedyAnswers:
    """Greedy continuations of an evaluation's prompts, decoded, from one engine: prompts that share a
    prefix (the haystack before each needle, a task's shared context) reuse its states through the
    engine's prompt cache, which changes no answer (`longctx.infer.prompt_cache`). Generation stops at
    the end-of-text token. spec: the engine's configuration (`longctx.infer.engine.EngineSpec`; default:
    the exact defaults). Build one per pass over a fixed model: cached states belong to these weights."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, spec=None):
        from longctx.infer.engine import Engine, EngineSpec

        self.tokenizer = tokenizer
        self.engine = Engine(model, None, spec or EngineSpec(), stop_at_eos=False)

    def __call__(self, prompt_ids: list[int], max_new_tokens: int) -> str:
        from longctx.infer.sampling import SamplingParams

        if max_new_tokens <= 0:
            return ""
        eos = self.tokenizer.eos_id
        params = SamplingParams(max_tokens=max_new_tokens, stop_ids={eos})
        out = self.engine.generate(prompt_ids, params).token_ids
        if out and out[-1] == eos:
            out = out[:-1]
        return self.tokenizer.decode(out)


def beyond_trained_length(model: GPT, length: int) -> bool:
    """True when `length` tokens is past what the config claims to address (max_seq_len x scaling)."""
    return length > model.config.context_length
