"""Needle in a haystack (after gkamradt/LLMTest_NeedleInAHaystack), for base models and without a judge.

The haystack (built-in original essay prose, or any text file) is repeated and cut so that the whole prompt
plus the answer budget fits `length` tokens of the model's tokenizer; the needle goes at the sentence
boundary at or before `depth` percent of the context (appended at 100), as the reference moves the
insertion point back to the previous period. The question follows, then an answer prefix so a base model
completes the answer. Score: 1 when the expected answer is a substring of the output (case and whitespace
normalised), else 0; `recall` (fraction of the answer's words in the output) is kept for diagnosis.
The heatmap (length x depth, red to green) is drawn by `longctx.eval.plots.heatmap`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from longctx.data.tokenizer import Tokenizer
from longctx.errors import ConfigError, DataError
from longctx.eval.prompting import GreedyAnswers, beyond_trained_length, largest_fitting
from longctx.model import GPT

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
INSTRUCTION = " Don't give information outside the document or repeat your findings"
ANSWER_PREFIX = "The best thing to do in San Francisco is"
HAYSTACK_FILE = Path(__file__).with_name("haystack.txt")


def load_haystack(path: str | Path | None = None) -> str:
    p = Path(path) if path is not None else HAYSTACK_FILE
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise DataError(f"haystack file {p} does not exist; pass a text file to --haystack") from None
    text = re.sub(r"[ \t]+", " ", text).strip()
    if "." not in text:
        raise DataError(f"haystack {p} has no sentence ends ('.'); the needle goes at a sentence boundary")
    return text


def _context(haystack: str, n_chars: int) -> str:
    reps = n_chars // (len(haystack) + 1) + 1
    return "\n\n".join([haystack] * reps)[:n_chars]


def insertion_point(context: str, depth: float) -> int:
    """Character index of the sentence boundary at or before depth% of the context (end at 100%)."""
    if depth >= 100.0:
        return len(context)
    pos = int(len(context) * depth / 100.0)
    dot = context.rfind(".", 0, pos)
    return 0 if dot < 0 else dot + 1


def niah_text(haystack: str, n_chars: int, depth: float) -> str:
    context = _context(haystack, n_chars)
    at = insertion_point(context, depth)
    context = context[:at] + NEEDLE + context[at:]
    return f"{SYSTEM}\n\n{context}\n\n{QUESTION}{INSTRUCTION}\n{ANSWER_PREFIX}"


@dataclass
class NiahPrompt:
    text: str
    ids: list[int]
    depth: float
    context_chars: int


def build_prompt(
    tokenizer: Tokenizer, haystack: str, length: int, depth: float, max_new_tokens: int
) -> NiahPrompt:
    """The prompt whose tokens plus `max_new_tokens` fill `length` as closely as possible."""
    if not 0.0 <= depth <= 100.0:
        raise ConfigError(f"depth must be a percent in [0, 100], got {depth}")
    n = largest_fitting(
        lambda c: len(tokenizer.encode(niah_text(haystack, c, depth))),
        length - max_new_tokens,
        hint=length,
        what="needle-in-a-haystack prompt",
    )
    text = niah_text(haystack, n, depth)
    return NiahPrompt(text, tokenizer.encode(text), depth, n)


def _normalise(s: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", s.lower()).split())


def score_answer(output: str, answer: str = ANSWER) -> tuple[float, float]:
    """(substring score 0/1, word recall in [0, 1]) of the output against the expected answer."""
    out = _normalise(output)
    words = _normalise(answer).split()
    found = set(out.split())
    recall = sum(w in found for w in words) / len(words)
    return float(_normalise(answer) in out), recall


def default_max_new_tokens(tokenizer: Tokenizer) -> int:
    return len(tokenizer.encode(" " + ANSWER + ".")) + 8


def evaluate_niah(
    model: GPT,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    haystack: str | None = None,
    max_new_tokens: int | None = None,
    progress: bool = True,
    engine_spec=None,
    label: str = "",
) -> dict:
    """Score per (length, depth) cell (one run per cell, as the reference does: greedy is deterministic)."""
    model.eval()
    haystack = haystack if haystack is not None else load_haystack()
    max_new = max_new_tokens or default_max_new_tokens(tokenizer)
    answer = GreedyAnswers(model, tokenizer, engine_spec)
    rows, samples = [], []
    bar = tqdm(
        total=len(lengths) * len(depths), desc=f"niah {label}".strip(), unit="prompt", disable=not progress
    )
    for length in lengths:
        by_depth = {}
        for depth in depths:
            prompt = build_prompt(tokenizer, haystack, length, float(depth), max_new)
            output = answer(prompt.ids, max_new)
            score, recall = score_answer(output)
            by_depth[str(depth)] = score
            samples.append(
                {
                    "length": length,
                    "depth": depth,
                    "output": output,
                    "score": score,
                    "recall": recall,
                    "prompt_tokens": len(prompt.ids),
                }
            )
            bar.update()
        rows.append(
            {
                "length": length,
                "score": sum(by_depth.values()) / len(by_depth),
                "by_depth": by_depth,
                "beyond_trained_length": beyond_trained_length(model, length),
            }
        )
    bar.close()
    return {
        "rows": rows,
        "prompt_cache": answer.engine.prompt_cache_stats(),
        "depths": [float(d) for d in depths],
        "score": sum(r["score"] for r in rows) / len(rows),
        "samples": samples,
    }
