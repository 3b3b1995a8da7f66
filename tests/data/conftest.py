"""Shared fixtures for the data tests: a small BPE tokenizer trained once per session."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from longctx.data.bpe import train_bpe
from longctx.data.tokenizer import HFTokenizer

WORDS = "the|cat|sat|on|a|mat|def|return|import|naïve|café|日本語|テキスト|emoji|🎉|x = 1|\n|    |Ωμέγα|über".split(
    "|"
)


def tiny_corpus_text(n_words: int = 1200, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="session")
def corpus_text():
    """`corpus_text(n_words, seed)`: deterministic text mixing ASCII, code and other scripts."""
    return tiny_corpus_text


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = tmp_path_factory.mktemp("bpe_corpus") / "corpus.txt"
    corpus.write_text(tiny_corpus_text(), encoding="utf-8")
    out = tmp_path_factory.mktemp("bpe")
    train_bpe(str(corpus), 400, out, show_progress=False)
    return out


@pytest.fixture(scope="session")
def bpe(bpe_dir: Path) -> HFTokenizer:
    return HFTokenizer.from_file(bpe_dir / "tokenizer.json")
