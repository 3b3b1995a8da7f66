"""Passkey retrieval samples: exact length, the key sentence once, the answer at the end; batch mixing is
deterministic and leaves the other rows alone."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from longctx.data.packing import sample_batch
from longctx.data.synthetic import (
    FILLER,
    KEY_SENTENCE,
    PREAMBLE,
    QUESTION,
    min_retrieval_length,
    mix_retrieval,
    retrieval_rng,
    retrieval_sample,
)
from longctx.data.tokenizer import ByteTokenizer, HFTokenizer
from longctx.errors import ConfigError


def _reference_prompt(key: int, before_chars: int, after_chars: int) -> str:
    """The reference scripts' prompt (five parts joined by newlines, filler cut by characters) + answer."""
    filler = " ".join([FILLER] * 200)
    parts = [PREAMBLE, filler[:before_chars], KEY_SENTENCE.format(key=key), filler[:after_chars], QUESTION]
    return "\n".join(parts) + f" {key}"


@pytest.mark.parametrize("kind", ["byte", "bpe"])
@pytest.mark.parametrize("length", [300, 517, 1024])
def test_sample_length_key_and_answer(kind: str, length: int, bpe: HFTokenizer) -> None:
    tok = ByteTokenizer() if kind == "byte" else bpe
    for seed in range(5):
        ids, answer_start = retrieval_sample(tok, length, np.random.default_rng(seed))
        assert len(ids) == length + 1
        text = tok.decode(ids)
        key = int(re.search(r"The pass key is (\d+)\. Remember", text).group(1))
        assert 1 <= key <= 50000
        assert text.count(KEY_SENTENCE.format(key=key)) == 1
        # filler has no digits: the key appears twice in its sentence and once as the answer, nowhere else
        assert re.findall(r"\d+", text) == [str(key)] * 3
        assert text.startswith(PREAMBLE + "\n") and text.endswith(f"\n{QUESTION} {key}")
        assert ids[answer_start:] == tok.encode(f" {key}")


def test_byte_sample_equals_reference_prompt() -> None:
    # with bytes, token slicing is character slicing: the sample is exactly the reference text
    tok = ByteTokenizer()
    ids, _ = retrieval_sample(tok, 700, np.random.default_rng(0), key=1234, depth=0.25)
    text = tok.decode(ids)
    before = text.split("\n")[1]
    after = text.split("\n")[3]
    assert text == _reference_prompt(1234, len(before), len(after))
    assert len(before) == round(0.25 * (len(before) + len(after)))


def test_too_short_length_is_rejected() -> None:
    tok = ByteTokenizer()
    with pytest.raises(ConfigError, match="at least"):
        retrieval_sample(tok, 100, np.random.default_rng(0))
    n = min_retrieval_length(tok)
    ids, _ = retrieval_sample(tok, n, np.random.default_rng(0), key=50000)
    assert len(ids) == n + 1


def test_mix_retrieval_is_deterministic_and_pure() -> None:
    tok = ByteTokenizer()
    tokens = np.random.default_rng(0).integers(0, 256, size=20000).astype(np.uint16)
    batch = sample_batch(tokens, 400, 8, seed=1, step=5)
    before = {k: v.clone() for k, v in batch.items()}
    a = mix_retrieval(batch, tok, 0.25, retrieval_rng(1, 5))
    b = mix_retrieval(batch, tok, 0.25, retrieval_rng(1, 5))
    assert all(torch.equal(batch[k], before[k]) for k in batch)  # input untouched
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = [r for r in range(8) if not torch.equal(a["input_ids"][r], batch["input_ids"][r])]
    assert len(changed) == round(0.25 * 8)
    for r in range(8):
        if r in changed:
            text = tok.decode(a["input_ids"][r].tolist() + a["labels"][r, -1:].tolist())
            assert text.startswith(PREAMBLE) and "pass key is" in text
            assert torch.equal(a["position_ids"][r], torch.arange(400))
        else:
            assert all(torch.equal(a[k][r], batch[k][r]) for k in a)
        assert torch.equal(a["input_ids"][r, 1:], a["labels"][r, :-1])
    # the trainer's call: seed and step instead of a generator
    assert all(torch.equal(a[k], v) for k, v in mix_retrieval(batch, tok, 0.25, seed=1, step=5).items())
    other = mix_retrieval(batch, tok, 0.25, retrieval_rng(1, 6))
    assert not torch.equal(other["input_ids"], a["input_ids"])


def test_mix_retrieval_edge_cases() -> None:
    tok = ByteTokenizer()
    tokens = np.random.default_rng(0).integers(0, 256, size=5000).astype(np.uint16)
    short = sample_batch(tokens, 64, 4, seed=0, step=0)  # shorter than any sample: unchanged
    assert torch.equal(mix_retrieval(short, tok, 1.0, retrieval_rng(0, 0))["input_ids"], short["input_ids"])
    batch = sample_batch(tokens, 300, 4, seed=0, step=0)
    assert torch.equal(mix_retrieval(batch, tok, 0.0, retrieval_rng(0, 0))["input_ids"], batch["input_ids"])
    full = mix_retrieval(batch, tok, 1.0, retrieval_rng(0, 0))
    assert all(tok.decode(row.tolist()).startswith(PREAMBLE) for row in full["input_ids"])
    with pytest.raises(ConfigError, match="retrieval_mix"):
        mix_retrieval(batch, tok, 1.5, retrieval_rng(0, 0))
