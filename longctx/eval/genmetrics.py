"""Generation metrics, computed by the libraries the field reports with, at their defaults.

- BLEU: `sacrebleu.corpus_bleu` (13a tokenizer, exp smoothing, 4-grams; 0-100).
- ROUGE: `rouge_score.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)`, mean F-measure over
  examples (0-1, as the library returns it). Its tokenizer keeps only [a-z0-9], so non-Latin text scores 0.
- Exact match: the prediction equals a reference after lower-casing and collapsing whitespace (0-1).
A reference may be one string or a list of strings (BLEU: several reference streams; ROUGE: the best
reference per example, `score_multi`; exact match: any reference).

`evaluate_generation` reads a JSONL file of {"prompt": ..., "reference": ...} records, generates greedily
from each prompt and scores the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from longctx.data.sources import read_jsonl
from longctx.data.tokenizer import Tokenizer
from longctx.errors import ConfigError, DataError
from longctx.eval.prompting import GreedyAnswers, beyond_trained_length
from longctx.model import GPT

METRIC_NAMES = ("bleu", "rouge", "exact_match")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

Reference = str | Sequence[str]


def _as_lists(refs: Sequence[Reference]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in refs]


def bleu(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Corpus BLEU (0-100). With several references per example, every example needs the same number."""
    import sacrebleu

    refs = _as_lists(references)
    counts = {len(r) for r in refs}
    if len(counts) != 1:
        raise DataError(
            f"BLEU needs the same number of references for every example (found counts {sorted(counts)})"
        )
    streams = [[r[i] for r in refs] for i in range(counts.pop())]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (0-1) over examples; the best reference per example."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, refs in zip(predictions, _as_lists(references)):
        scores = scorer.score_multi(refs, pred) if len(refs) > 1 else scorer.score(refs[0], pred)
        for t in ROUGE_TYPES:
            totals[t] += scores[t].fmeasure
    return {t: v / len(predictions) for t, v in totals.items()}


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    return sum(
        any(_norm(p) == _norm(r) for r in refs) for p, refs in zip(predictions, _as_lists(references))
    ) / len(predictions)


def parse_metrics(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METRIC_NAMES]
    if bad or not names:
        raise ConfigError(f"unknown metric(s) {bad or spec!r}; choose from {', '.join(METRIC_NAMES)}")
    return names


def score(predictions: Sequence[str], references: Sequence[Reference], metrics: Sequence[str]) -> dict:
    if len(predictions) != len(references) or not predictions:
        raise DataError(
            f"{len(predictions)} predictions for {len(references)} references; need the same non-zero number"
        )
    out: dict[str, float] = {}
    for m in metrics:
        if m == "bleu":
            out["bleu"] = bleu(predictions, references)
        elif m == "rouge":
            out.update(rouge(predictions, references))
        elif m == "exact_match":
            out["exact_match"] = exact_match(predictions, references)
    return out


def load_records(path: str | Path) -> list[dict]:
    """JSONL records with a string `prompt` and a string (or list of strings) `reference`."""
    records = read_jsonl(path, {"prompt": (str,), "reference": (str, list)})
    for i, rec in enumerate(records):
        ref = rec["reference"]
        if isinstance(ref, list) and not (ref and all(isinstance(r, str) for r in ref)):
            raise DataError(
                f"{path}: record {i + 1} needs a string or a non-empty list of strings 'reference'"
            )
    return records


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if s and i >= 0:
            cut = min(cut, i)
    return text[:cut]


def evaluate_generation(
    model: GPT,
    tokenizer: Tokenizer,
    records: Sequence[dict],
    metrics: Sequence[str],
    *,
    max_new_tokens: int = 64,
    stop: Sequence[str] = (),
    strip: bool = True,
    progress: bool = True,
    engine_spec=None,
    label: str = "",
) -> dict:
    model.eval()
    answer = GreedyAnswers(model, tokenizer, engine_spec)
    preds, longest, samples = [], 0, []
    for rec in tqdm(records, desc=f"gen {label}".strip(), unit="example", disable=not progress):
        ids = tokenizer.encode(rec["prompt"])
        longest = max(longest, len(ids) + max_new_tokens)
        out = cut_at_stop(answer(ids, max_new_tokens), stop)
        out = out.strip() if strip else out
        preds.append(out)
        samples.append({"prompt_tokens": len(ids), "output": out, "reference": rec["reference"]})
    return {
        "metrics": score(preds, [r["reference"] for r in records], metrics),
        "examples": len(records),
        "longest_tokens": longest,
        "beyond_trained_length": beyond_trained_length(model, longest),
        "samples": samples,
    }
