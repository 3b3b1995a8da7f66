"""Generated long-document tasks for fine-tuning tests and examples (no downloads).

Both tasks hide one fact — an upper-case key word — in a document of lower-case filler, at a chosen depth
(0 = the first sentence, 1 = just before the question; None = uniform at random), and ask about it at the
end. The filler never contains upper-case letters, so the key is the only evidence: a model that does
not see the key's sentence is at chance, one that sees it can be perfect. With the key at depth 0,
`--truncate tail` and a `--max-len` shorter than the document cut it off (short context must fail, long
context can succeed); with a random depth, the share of documents whose key survives truncation grows
with the length kept, so the score climbs with context length.

- `key_classification`: {"text", "label"}; the label is the key word in lower case.
- `key_qa`: {"prompt", "completion"}; the completion is " " + the key word (a copy from far away: the
  retrieval skill of passkey tests, learned by supervised fine-tuning).

Lengths are in characters (ASCII only: one byte-tokenizer token per character).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from longctx.errors import ConfigError

KEYS = ("GOLD", "IRON", "JADE", "RUBY", "OPAL", "ONYX", "TEAL", "SAGE")
FILLER_WORDS = (
    "the",
    "a",
    "river",
    "stone",
    "walks",
    "under",
    "quiet",
    "green",
    "hill",
    "over",
    "small",
    "light",
    "morning",
    "field",
    "old",
    "road",
    "turns",
    "near",
    "water",
    "slowly",
    "bright",
    "cloud",
    "and",
    "then",
    "house",
    "sleeps",
    "wind",
    "moves",
    "across",
    "far",
)
CLASSIFY_KEY = "Account class: {key}."
CLASSIFY_QUESTION = "Which account class was stated?"
QA_KEY = "The secret word is {key}."
QA_QUESTION = "Question: what is the secret word?\nAnswer:"


def _filler(rng: random.Random, n_chars: int) -> str:
    """Lower-case sentences of exactly n_chars characters (each ends with '. ')."""
    out: list[str] = []
    size = 0
    while size < n_chars:
        words = [rng.choice(FILLER_WORDS) for _ in range(rng.randint(4, 9))]
        sentence = " ".join(words) + ". "
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_chars]


def _document(rng: random.Random, key_sentence: str, question: str, n_chars: int, depth: float | None) -> str:
    """key sentence + filler around it + question, n_chars characters in all."""
    n_filler = n_chars - len(key_sentence) - len(question) - 2  # two newlines
    if n_filler < 0:
        raise ConfigError(f"a document needs at least {n_chars - n_filler} characters, got {n_chars}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth must be in [0, 1] (or None for random), got {depth}")
    before = round((rng.random() if depth is None else depth) * n_filler)
    text = _filler(rng, n_filler)
    return text[:before] + key_sentence + " " + text[before:] + "\n" + question


def _keys(n_classes: int) -> Sequence[str]:
    if not 2 <= n_classes <= len(KEYS):
        raise ConfigError(f"n_classes must be in [2, {len(KEYS)}], got {n_classes}")
    return KEYS[:n_classes]


def key_classification(
    n: int, n_chars: int, *, seed: int, n_classes: int = 2, depth: float | None = 0.0
) -> list[dict]:
    """n records {"text", "label"}: the label is the key word stated once in the document (lower case)."""
    rng = random.Random(f"key_classification:{seed}")
    keys = _keys(n_classes)
    records = []
    for i in range(n):
        key = keys[i % len(keys)]  # balanced classes
        text = _document(rng, CLASSIFY_KEY.format(key=key), CLASSIFY_QUESTION, n_chars, depth)
        records.append({"text": text, "label": key.lower()})
    rng.shuffle(records)
    return records


def key_qa(n: int, n_chars: int, *, seed: int, n_keys: int = 4, depth: float | None = 0.0) -> list[dict]:
    """n records {"prompt", "completion"}: the completion repeats the key word stated in the prompt."""
    rng = random.Random(f"key_qa:{seed}")
    keys = _keys(n_keys)
    return [
        {
            "prompt": _document(rng, QA_KEY.format(key=key), QA_QUESTION, n_chars, depth),
            "completion": " " + key,
        }
        for key in (rng.choice(keys) for _ in range(n))
    ]


def write_jsonl(records: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
