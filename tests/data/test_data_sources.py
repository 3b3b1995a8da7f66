"""Sources: every kind yields the expected documents; bad inputs raise DataError saying what to fix."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longctx.data.sources import iter_documents, resolve_files, stdlib_files, stdlib_root
from longctx.errors import DataError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_single_text_file(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.txt", "hello ü\n")
    assert list(iter_documents(str(f))) == [("a.txt", "hello ü\n")]


def test_folder_recursive_sorted_skips_hidden_and_binary(tmp_path: Path) -> None:
    _write(tmp_path / "b.txt", "B")
    _write(tmp_path / "a" / "z.md", "Z")
    _write(tmp_path / ".hidden.txt", "no")
    _write(tmp_path / ".git" / "config", "no")
    _write(tmp_path / "__pycache__" / "x.txt", "no")
    (tmp_path / "img.bin").write_bytes(b"\x89PNG\x00\x00\x01")
    assert list(iter_documents(str(tmp_path))) == [("a/z.md", "Z"), ("b.txt", "B")]


def test_glob_names_relative_to_fixed_prefix(tmp_path: Path) -> None:
    _write(tmp_path / "d" / "x1.txt", "one")
    _write(tmp_path / "d" / "sub" / "x2.txt", "two")
    _write(tmp_path / "d" / "y.md", "not matched")
    assert list(iter_documents(str(tmp_path / "d" / "**" / "*.txt"))) == [
        ("sub/x2.txt", "two"),
        ("x1.txt", "one"),
    ]
    assert list(iter_documents(str(tmp_path / "d" / "x?.txt"))) == [("x1.txt", "one")]


def test_glob_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "d" / "x1.txt", "one")
    monkeypatch.chdir(tmp_path)
    assert list(iter_documents("d/*.txt")) == [("x1.txt", "one")]


def test_jsonl_one_document_per_line(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "first", "id": 1}) + "\n\n" + json.dumps({"text": "二"}) + "\n")
    assert list(iter_documents(str(f))) == [("c.jsonl:1", "first"), ("c.jsonl:3", "二")]


def test_parquet_text_column(tmp_path: Path) -> None:
    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "", "gamma"], "n": [1, 2, 3, 4]}), f)
    assert list(iter_documents(str(f))) == [("c.parquet:0", "alpha"), ("c.parquet:3", "gamma")]


def test_folder_mixes_kinds(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "plain")
    _write(tmp_path / "b.jsonl", json.dumps({"text": "line"}) + "\n")
    pq.write_table(pa.table({"text": ["row"]}), tmp_path / "c.parquet")
    assert [t for _, t in iter_documents(str(tmp_path))] == ["plain", "line", "row"]


def test_stdlib_listing_is_deterministic_and_excludes_installed_packages() -> None:
    files = stdlib_files()
    assert files and files == stdlib_files() and files == sorted(files)
    assert not any(p in f.parts for f in files for p in ("site-packages", "dist-packages"))
    assert stdlib_root() / "json" / "decoder.py" in files
    # only the first documents are read: the whole corpus is not needed to check the order
    first = list(itertools.islice(iter_documents(None), 3))
    assert first == list(itertools.islice(iter_documents("stdlib"), 3))
    assert [name for name, _ in first] == [f.relative_to(stdlib_root()).as_posix() for f in files[:3]]
    assert all(text == f.read_text(encoding="utf-8", errors="replace") for (_, text), f in zip(first, files))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: str(d / "nope.txt"), "does not exist"),
        (lambda d: str(d / "nope" / "*.txt"), "matches no files"),
        (lambda d: str(_mkdir(d / "empty")), "holds no readable text files"),
        (lambda d: str(_write(d / "h" / ".x", "hidden").parent), "holds no readable text files"),
        (lambda d: str(_write(d / "bad.jsonl", '{"text": "ok"}\n{oops\n')), r"bad.jsonl:2 is not valid JSON"),
        (lambda d: str(_write(d / "nt.jsonl", '{"body": "x"}\n')), r"nt.jsonl:1 has no string 'text' field"),
        (lambda d: str(_write(d / "num.jsonl", '{"text": 3}\n')), r"num.jsonl:1 has no string 'text'"),
        (lambda d: str(_write(d / "arr.jsonl", "[1, 2]\n")), r"arr.jsonl:1 has no string 'text'"),
        (
            lambda d: str(_parquet(d / "p.parquet", {"body": ["x"]})),
            r"no 'text' column \(columns: \['body'\]\)",
        ),
        (lambda d: str(_parquet(d / "q.parquet", {"text": [1, 2]})), "expected string"),
        (lambda d: str(_write(d / "broken.parquet", "not parquet")), "not a readable parquet file"),
    ],
)
def test_bad_sources_raise_data_error(tmp_path: Path, make, match: str) -> None:
    source = make(tmp_path)
    with pytest.raises(DataError, match=match):
        list(iter_documents(source))


def test_missing_path_is_reported_before_reading(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pass a file, folder, glob"):
        resolve_files(str(tmp_path / "missing"))


def _mkdir(d: Path) -> Path:
    d.mkdir()
    return d


def _parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path
