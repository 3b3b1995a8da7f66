"""Task data: truncation rules, JSONL validation, label ids, completion-only labels, synthetic documents."""

import json
import re

import pytest

from longctx.data.sources import read_jsonl
from longctx.data.synthetic_tasks import CLASSIFY_KEY, KEYS, QA_QUESTION, key_classification, key_qa
from longctx.data.tokenizer import ByteTokenizer
from longctx.errors import ConfigError, DataError
from longctx.tasks.data import LabelMap, collate_generate, generate_examples, truncate
from longctx.train.loss import IGNORE_INDEX


def test_truncation_keeps_head_tail_or_both_ends():
    ids = list(range(10))
    assert truncate(ids, 4, "head") == [0, 1, 2, 3]
    assert truncate(ids, 4, "tail") == [6, 7, 8, 9]
    # LongBench: prompt[:half] + prompt[-half:]
    assert truncate(ids, 4, "middle") == [0, 1, 8, 9]
    assert truncate(ids, 5, "middle") == [0, 1, 7, 8, 9]
    for how in ("head", "tail", "middle"):
        assert truncate(ids, 10, how) == ids and truncate(ids, 50, how) == ids
    with pytest.raises(ConfigError, match="unknown truncation"):
        truncate(ids, 4, "start")


def test_jsonl_errors_name_the_line_and_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "a", "label": 1}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2 needs a str or int field 'label'"):
        read_jsonl(p, {"text": (str,), "label": (str, int)})
    p.write_text('{"text": "a", "label": true}\n')
    with pytest.raises(DataError, match="label"):
        read_jsonl(p, {"text": (str,), "label": (str, int)})
    p.write_text("{not json\n")
    with pytest.raises(DataError, match="d.jsonl:1 is not valid JSON"):
        read_jsonl(p, {"text": (str,)})
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl", {"text": (str,)})


def test_label_ids_do_not_depend_on_file_order():
    a, b = LabelMap(["pos", "neg", 3, "neg", 1]), LabelMap([1, "pos", 3, "neg"])
    assert a.to_list() == b.to_list() == [1, 3, "neg", "pos"]
    assert [a.id(v) for v in (1, 3, "neg", "pos")] == [0, 1, 2, 3]
    with pytest.raises(DataError, match="not seen in the training data"):
        a.id("other")
    with pytest.raises(DataError, match="at least 2"):
        LabelMap(["only"])


def test_generate_labels_cover_the_completion_only():
    tok = ByteTokenizer()
    recs = [{"prompt": "abcdef", "completion": "XY"}, {"prompt": "pq", "completion": "Z"}]
    ex = generate_examples(recs, tok, max_len=6, how="tail")
    assert ex[0].prompt == tok.encode("def")  # 6 - len("XY" + eos) = 3 prompt tokens kept, from the tail
    b = collate_generate(ex, tok.pad_id)
    seq0 = tok.encode("def") + tok.encode("XY") + [tok.eos_id]
    assert b["input_ids"][0].tolist() == seq0[:-1]
    # position t predicts token t+1: only those whose next token is X, Y, eos are labelled
    assert b["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, *tok.encode("XY"), tok.eos_id]
    seq1 = tok.encode("pq") + tok.encode("Z") + [tok.eos_id]
    assert b["input_ids"][1].tolist() == seq1[:-1] + [tok.pad_id] * 2
    assert b["labels"][1].tolist() == [IGNORE_INDEX, *tok.encode("Z"), tok.eos_id, IGNORE_INDEX, IGNORE_INDEX]
    with pytest.raises(DataError, match="raise --max-len"):
        generate_examples([{"prompt": "a", "completion": "long answer"}], tok, max_len=5, how="tail")


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0, None])
def test_key_documents_hold_one_key_at_the_asked_depth(depth):
    recs = key_classification(40, 200, seed=3, n_classes=4, depth=depth)
    assert sorted({r["label"] for r in recs}) == sorted(k.lower() for k in KEYS[:4])
    assert {sum(r["label"] == lab for r in recs) for lab in {r["label"] for r in recs}} == {10}
    for r in recs:
        assert len(r["text"]) == 200 and r["text"].isascii()
        assert re.findall(r"[A-Z]{4}", r["text"]) == [r["label"].upper()]  # the only upper-case word
        start = r["text"].index(CLASSIFY_KEY.format(key=r["label"].upper()))
        if depth == 0.0:
            assert start == 0
        elif depth == 1.0:
            assert r["text"][start:].count(" ") > 0 and start > 100
    assert key_classification(5, 200, seed=3) == key_classification(5, 200, seed=3)


def test_key_qa_answer_is_the_stated_key():
    for r in key_qa(10, 120, seed=0):
        assert r["prompt"].endswith(QA_QUESTION) and len(r["prompt"]) == 120
        assert re.findall(r"[A-Z]{4}", r["prompt"]) == [r["completion"].strip()]
