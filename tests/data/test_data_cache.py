"""The token cache: contents equal direct encoding, split by document, built once, safe when builds race
or die half-way."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from longctx.data import cache
from longctx.data.cache import cache_key, token_file
from longctx.data.sources import is_validation, iter_documents
from longctx.data.tokenizer import ByteTokenizer, HFTokenizer
from longctx.errors import DataError

VAL = 0.3


@pytest.fixture
def corpus(tmp_path: Path, corpus_text) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(30):
        # <|endoftext|> inside a document must stay text, not become a separator
        extra = " <|endoftext|> " if i == 3 else ""
        (d / f"doc{i:02d}.txt").write_text(corpus_text(40, seed=i) + extra)
    (d / "blank.txt").write_text("   \n")  # blank documents are skipped
    return d


def _expected(source: str, encode, eos: int) -> dict[str, list[int]]:
    """The reference: each non-blank document encoded alone, followed by eos, in source order."""
    out: dict[str, list[int]] = {"train": [], "val": []}
    for name, text in iter_documents(source):
        if text.strip():
            out["val" if is_validation(name, VAL) else "train"] += list(encode(text)) + [eos]
    return out


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_memmap_equals_direct_encoding_split_by_document(
    corpus: Path, tmp_path: Path, bpe: HFTokenizer, kind: str
) -> None:
    tok = ByteTokenizer() if kind == "byte" else bpe
    encode = tok.encode if kind == "byte" else (lambda t: bpe.encode(t, special_tokens=False))
    want = _expected(str(corpus), encode, tok.eos_id)
    assert want["train"] and want["val"]  # the corpus really has both splits
    for split in ("train", "val"):
        got = token_file(str(corpus), tok, split, cache_dir=tmp_path / "cache", val_fraction=VAL)
        assert isinstance(got, np.memmap) and not got.flags.writeable
        assert got.tolist() == want[split]
    # disjoint by document: every document's name lands in exactly one split, and the eos count says so
    names = [n for n, t in iter_documents(str(corpus)) if t.strip()]
    n_val = sum(is_validation(n, VAL) for n in names)
    train = token_file(str(corpus), tok, "train", cache_dir=tmp_path / "cache", val_fraction=VAL)
    val = token_file(str(corpus), tok, "val", cache_dir=tmp_path / "cache", val_fraction=VAL)
    assert int((val == tok.eos_id).sum()) == n_val
    assert int((train == tok.eos_id).sum()) == len(names) - n_val


def test_second_call_does_not_retokenize(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = token_file(str(corpus), ByteTokenizer(), cache_dir=tmp_path, val_fraction=VAL)
    built = tmp_path / cache_key(str(corpus), ByteTokenizer(), VAL) / "train.bin"
    mtime = built.stat().st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("re-tokenized an unchanged corpus")

    monkeypatch.setattr(cache, "_write", fail)
    again = token_file(str(corpus), ByteTokenizer(), cache_dir=tmp_path, val_fraction=VAL)
    assert np.array_equal(first, again) and built.stat().st_mtime_ns == mtime


def test_changed_corpus_or_tokenizer_changes_key(corpus: Path, bpe: HFTokenizer) -> None:
    key = cache_key(str(corpus), ByteTokenizer(), VAL)
    assert cache_key(str(corpus), bpe, VAL) != key
    assert cache_key(str(corpus), ByteTokenizer(), 0.1) != key
    (corpus / "doc00.txt").write_text("changed")
    assert cache_key(str(corpus), ByteTokenizer(), VAL) != key
    # a glob's key follows its files too
    gkey = cache_key(str(corpus / "doc*.txt"), ByteTokenizer(), VAL)
    (corpus / "doc01.txt").write_text("changed as well")
    assert cache_key(str(corpus / "doc*.txt"), ByteTokenizer(), VAL) != gkey


def test_concurrent_builds_tokenize_once(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = cache._write

    def slow_write(*a, **k):
        calls.append(1)
        time.sleep(0.3)  # keep the build open long enough that the other threads arrive during it
        real(*a, **k)

    monkeypatch.setattr(cache, "_write", slow_write)
    results: list[np.ndarray] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                np.array(token_file(str(corpus), ByteTokenizer(), cache_dir=tmp_path, val_fraction=VAL))
            )
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    assert all(np.array_equal(r, results[0]) for r in results)


def test_killed_build_is_never_used(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = cache._write

    def dies_half_way(source, tokenizer, out: Path, val_fraction):
        (out / "train.bin").write_bytes(b"\x01\x00" * 5)
        raise KeyboardInterrupt  # as if the process were stopped mid-build

    monkeypatch.setattr(cache, "_write", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        token_file(str(corpus), ByteTokenizer(), cache_dir=tmp_path, val_fraction=VAL)
    key = cache_key(str(corpus), ByteTokenizer(), VAL)
    assert not (tmp_path / key).exists()
    # a leftover from a build killed with SIGKILL (no cleanup ran) is ignored and removed
    (tmp_path / f"{key}.tmp-dead").mkdir()
    (tmp_path / f"{key}.tmp-dead" / "train.bin").write_bytes(b"\x01\x00")
    monkeypatch.setattr(cache, "_write", real)
    got = token_file(str(corpus), ByteTokenizer(), cache_dir=tmp_path, val_fraction=VAL)
    assert got.tolist() == _expected(str(corpus), ByteTokenizer().encode, 256)["train"]
    assert not list(tmp_path.glob(f"{key}.tmp-*"))


def test_single_document_splits_its_tail(tmp_path: Path, corpus_text) -> None:
    f = tmp_path / "book.txt"
    text = corpus_text(500)
    f.write_text(text)
    train = token_file(str(f), ByteTokenizer(), "train", cache_dir=tmp_path / "c", val_fraction=0.1)
    val = token_file(str(f), ByteTokenizer(), "val", cache_dir=tmp_path / "c", val_fraction=0.1)
    full = list(text.encode()) + [256]
    assert train.tolist() + val.tolist() == full
    assert len(val) == int(len(full) * 0.1)


def test_empty_corpus_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(" \n\t\n")
    with pytest.raises(DataError, match="empty"):
        token_file(str(tmp_path / "d"), ByteTokenizer(), cache_dir=tmp_path / "c")
    assert not [p for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")]
    with pytest.raises(DataError, match="does not exist"):
        token_file(str(tmp_path / "missing"), ByteTokenizer(), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="split"):
        token_file(str(tmp_path / "d"), ByteTokenizer(), "test", cache_dir=tmp_path / "c")
    (tmp_path / "d" / "a.txt").write_text("x" * 50)
    with pytest.raises(DataError, match="val split .* is empty"):
        token_file(str(tmp_path / "d"), ByteTokenizer(), "val", cache_dir=tmp_path / "c", val_fraction=0.0)


def test_stdlib_cache_counts_documents_exactly(tmp_path: Path) -> None:
    # the one test that tokenizes the whole embedded corpus (~30M bytes, about 2 s with the byte tokenizer)
    tok = ByteTokenizer()
    train = token_file(None, tok, "train", cache_dir=tmp_path)
    val = token_file(None, tok, "val", cache_dir=tmp_path)
    names = [name for name, text in iter_documents(None) if text.strip()]
    n_val = sum(is_validation(n, 0.05) for n in names)
    assert 0 < n_val < len(names)
    # byte ids of text are < 256, so every eos is a document separator
    assert int((val == tok.eos_id).sum()) == n_val
    assert int((train == tok.eos_id).sum()) == len(names) - n_val
