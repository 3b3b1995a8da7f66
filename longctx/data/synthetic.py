"""Synthetic passkey-retrieval training samples: a number hidden in filler, asked for at the end.

The wording is the passkey test's (Landmark attention / YaRN / LongLoRA, see
shared/reference/long-context-evals.md §1), five parts joined by newlines:

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. ...
    {filler, first part}
    The pass key is K. Remember it. K is the pass key.
    {filler, second part}
    What is the pass key? The pass key is K

The evaluation cuts the filler by characters; here it is cut by *tokens*, so that a sample has exactly the
requested length and can replace a packed training row. Every part ends at a newline, where byte-level
BPE splits words anyway, so the pieces encode as the whole text would.

`mix_retrieval` puts such samples into a training batch (the `retrieval_mix` option of training).
"""

from __future__ import annotations

import numpy as np
import torch

from longctx.data.tokenizer import Tokenizer
from longctx.errors import ConfigError

PREAMBLE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MAX_KEY = 50000  # keys are uniform in [1, MAX_KEY], as in the reference scripts
_KEY_SLACK = 2
_RNG_TAG = 0x7E7  # separates the retrieval stream from the batch-sampling stream of the same (seed, step)


def retrieval_rng(seed: int, step: int) -> np.random.Generator:
    """The generator `mix_retrieval` should get at an optimizer step: a pure function of (seed, step)."""
    return np.random.default_rng([seed, step, _RNG_TAG])


def _filler_ids(tokenizer: Tokenizer, n: int) -> list[int]:
    # the filler is the sentence block joined by spaces; " " + block encodes the same in any repeat
    first = tokenizer.encode(FILLER)
    rest = tokenizer.encode(" " + FILLER)
    reps = max(0, -(-(n - len(first)) // len(rest)))
    return (first + rest * reps)[:n]


def min_retrieval_length(tokenizer: Tokenizer, preamble: bool = False) -> int:
    """A `length_tokens` that holds a sample with any key (no filler; with or without the preamble). A BPE
    may split some 5-digit keys into more tokens than MAX_KEY's, hence the slack for each of the key's
    three occurrences."""
    return sum(len(p) for p in _fixed_parts(tokenizer, MAX_KEY, preamble)) - 1 + 3 * _KEY_SLACK


def _fixed_parts(
    tokenizer: Tokenizer, key: int, preamble: bool = True
) -> tuple[list[int], list[int], list[int], list[int]]:
    """(head, key sentence, question, answer) ids; the two filler parts go between them."""
    head = tokenizer.encode(PREAMBLE + "\n") if preamble else []
    needle = tokenizer.encode("\n" + KEY_SENTENCE.format(key=key) + "\n")
    question = tokenizer.encode("\n" + QUESTION)
    answer = tokenizer.encode(f" {key}")
    return head, needle, question, answer


def retrieval_sample(
    tokenizer: Tokenizer,
    length_tokens: int,
    rng: np.random.Generator,
    *,
    key: int | None = None,
    depth: float | None = None,
) -> tuple[list[int], int]:
    """(ids, answer_start): exactly length_tokens + 1 ids (input = ids[:-1], labels = ids[1:]) ending with
    the answer " K"; ids[answer_start:] are the answer's tokens.

    The key is uniform in [1, 50000] and its sentence sits at a uniform random depth of the filler, unless
    `key` / `depth` (0 = right after the preamble, 1 = right before the question) fix them.
    A length too short for the preamble (~150 bytes) drops it, so that training at short lengths (e.g. 256
    bytes) can still practise retrieval.
    """
    if key is None:
        key = int(rng.integers(1, MAX_KEY + 1))
    preamble = length_tokens >= min_retrieval_length(tokenizer, preamble=True)
    head, needle, question, answer = _fixed_parts(tokenizer, key, preamble)
    n_filler = length_tokens + 1 - len(head) - len(needle) - len(question) - len(answer)
    if n_filler < 0:
        raise ConfigError(
            f"a retrieval sample needs at least {min_retrieval_length(tokenizer)} tokens with "
            f"this tokenizer, got length {length_tokens}; use a longer sequence length"
        )
    if depth is None:
        before = int(rng.integers(0, n_filler + 1))
    else:
        if not 0.0 <= depth <= 1.0:
            raise ConfigError(f"depth must be in [0, 1], got {depth}")
        before = round(depth * n_filler)
    # both filler parts are cut from the start of the filler, as in the reference scripts
    ids = (
        head + _filler_ids(tokenizer, before) + needle + _filler_ids(tokenizer, n_filler - before) + question
    )
    return ids + answer, len(ids)


def mix_retrieval(
    batch: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    fraction: float,
    rng: np.random.Generator | None = None,
    *,
    seed: int | None = None,
    step: int | None = None,
) -> dict[str, torch.Tensor]:
    """A copy of `batch` (input_ids, position_ids, labels: (B, T)) whose round(fraction * B) rows, chosen
    at random, are retrieval samples of length T. The input batch is not modified. While T is shorter than
    `min_retrieval_length(tokenizer)` (early in a length curriculum) no row is replaced.

    Randomness comes from `rng`, or from `retrieval_rng(seed, step)` when `seed` and `step` are given
    instead: a pure function of (batch, seed, step), so a resumed run sees the rows the uninterrupted run saw.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"retrieval_mix must be in [0, 1], got {fraction}")
    if rng is None:
        if seed is None or step is None:
            raise TypeError("mix_retrieval needs rng, or seed and step")
        rng = retrieval_rng(seed, step)
    input_ids = batch["input_ids"]
    B, T = input_ids.shape
    k = round(fraction * B)
    out = {name: t.clone() for name, t in batch.items()}
    if k == 0 or T < min_retrieval_length(tokenizer):
        return out
    rows = np.sort(rng.choice(B, size=k, replace=False))
    for r in rows:
        ids, _ = retrieval_sample(tokenizer, T, rng)
        seq = torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device)  # (T + 1,)
        out["input_ids"][r] = seq[:-1]
        out["labels"][r] = seq[1:].to(out["labels"].dtype)
        if "position_ids" in out:
            # one document from position 0, whether or not the batch restarts positions per document
            out["position_ids"][r] = torch.arange(T, dtype=out["position_ids"].dtype, device=input_ids.device)
    return out
