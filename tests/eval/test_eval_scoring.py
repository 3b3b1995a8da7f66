"""Scorers on hand-made answers; BLEU/ROUGE against the libraries' own outputs; effective length."""

from __future__ import annotations

import json

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from longctx.errors import ConfigError, DataError
from longctx.eval import genmetrics, ruler


def test_string_match_all_and_part():
    preds = ["The numbers are 123 and 456.", "nothing here", "UUID AbC-123"]
    refs = [["123", "456", "789"], ["1"], ["abc-123", "zzz"]]
    # per sample: 2/3, 0, 1/2 of the references found (case-insensitive substrings)
    assert ruler.string_match_all(preds, refs) == pytest.approx((2 / 3 + 0 + 1 / 2) / 3 * 100)
    # any reference found: 1, 0, 1
    assert ruler.string_match_part(preds, refs) == pytest.approx(2 / 3 * 100)


def test_postprocess_like_ruler():
    assert ruler.postprocess("  123\x00456\t7 \n") == "123\n456\n7"


def test_effective_length_and_weighted_average():
    scores = {4096: 92.0, 8192: 86.0, 16384: 85.6, 32768: 60.0}
    assert ruler.effective_length(scores) == 8192  # 85.6 itself does not exceed the threshold
    assert ruler.effective_length(scores, threshold=50) == 32768
    assert ruler.effective_length({4096: 10.0}) is None
    # the largest passing length, even past a failing one (the definition, not "contiguous from the start")
    assert ruler.effective_length({4096: 90.0, 8192: 80.0, 16384: 88.0}) == 16384
    assert ruler.weighted_average({1: 10.0, 2: 40.0}, "inc") == pytest.approx((10 + 2 * 40) / 3)
    assert ruler.weighted_average({1: 10.0, 2: 40.0}, "dec") == pytest.approx((2 * 10 + 40) / 3)


def test_zeta_without_scipy():
    import math

    assert ruler._zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-12)
    assert ruler._zeta(4.0) == pytest.approx(math.pi**4 / 90, rel=1e-12)


def test_keys_are_adjective_noun_pairs():
    assert len(ruler.KEY_WORDS) > 10000 and all(k.count("-") == 1 for k in ruler.KEY_WORDS[:50])
    pool = ruler.word_pool(len(ruler.PLAIN_WORDS) + 500)
    assert len(set(pool)) == len(pool) == len(ruler.PLAIN_WORDS) + 500


PREDS = ["the cat sat on the mat", "a quick brown fox jumps", "hello world", "long context models"]
REFS = [
    "the cat is on the mat",
    "the quick brown fox jumped over",
    "hello there world",
    "long context models",
]


def test_bleu_equals_sacrebleu():
    assert genmetrics.bleu(PREDS, REFS) == sacrebleu.corpus_bleu(PREDS, [REFS]).score
    multi = [[r, r.upper()] for r in REFS]
    assert (
        genmetrics.bleu(PREDS, multi) == sacrebleu.corpus_bleu(PREDS, [REFS, [r.upper() for r in REFS]]).score
    )
    assert genmetrics.bleu(REFS, REFS) == pytest.approx(100.0)
    with pytest.raises(DataError, match="same number of references"):
        genmetrics.bleu(PREDS[:2], [["a"], ["b", "c"]])


def test_rouge_equals_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    want = {
        t: sum(scorer.score(r, p)[t].fmeasure for p, r in zip(PREDS, REFS)) / len(PREDS)
        for t in ("rouge1", "rouge2", "rougeL")
    }
    assert genmetrics.rouge(PREDS, REFS) == pytest.approx(want)
    assert genmetrics.rouge(REFS, REFS) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})


def test_exact_match_and_metric_parsing():
    assert genmetrics.exact_match(PREDS, REFS) == 0.25
    assert genmetrics.exact_match(["Hello  World"], [["x", "hello world"]]) == 1.0
    assert genmetrics.parse_metrics("bleu, rouge") == ["bleu", "rouge"]
    with pytest.raises(ConfigError, match="unknown metric"):
        genmetrics.parse_metrics("meteor")
    assert genmetrics.cut_at_stop("abc\ndef", ["\n"]) == "abc"


def test_load_records(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "p", "reference": "r"}) + "\n\n" + json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(DataError, match=":3 needs"):
        genmetrics.load_records(f)
    f.write_text(json.dumps({"prompt": "p", "reference": ["r", "s"]}) + "\n")
    assert genmetrics.load_records(f) == [{"prompt": "p", "reference": ["r", "s"]}]
