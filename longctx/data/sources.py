"""Where text comes from. `iter_documents(source)` yields (name, text) in a deterministic order.

Sources: None / "stdlib" (the running Python's standard-library .py files — the embedded default corpus),
a file, a folder (recursively, hidden and binary files skipped), a glob (`data/*.txt`, `corpus/**/*.md`),
a `.jsonl` file (one `text` field per line) or a `.parquet` file (a `text` column). Folders and globs may
mix all of these. Each file, jsonl line or parquet row is one document.

Document names are relative to the source root (a folder's path, a glob's fixed prefix), so the hashed
train/validation split does not depend on the directory the command runs from. The split is by document,
so no document is in both.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longctx.errors import DataError

STDLIB = "stdlib"
_GLOB_CHARS = "*?["
# Installed packages live inside the stdlib folder; they are not "the standard library" and would make the
# corpus depend on what happens to be installed.
_STDLIB_PRUNE = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted. Walks with pruning: rglob would descend site-packages."""
    root = stdlib_root()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_PRUNE]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    if not files:
        raise DataError(
            f"no .py files under {root}: this Python has no standard-library sources; "
            "pass --data with your own text"
        )
    return sorted(files)


def is_validation(name: str, val_fraction: float) -> bool:
    """Deterministic split by document name (a hash, so adding files does not reshuffle the others)."""
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < val_fraction


def is_glob(source: str) -> bool:
    return any(ch in source for ch in _GLOB_CHARS) and not Path(source).exists()


def resolve_files(source: str | None) -> tuple[Path, list[Path]]:
    """(root, files): the files a source reads, in order, and the folder their names are relative to.

    Raises DataError for a missing path, an empty folder or a glob that matches nothing.
    """
    if source is None or source == STDLIB:
        return stdlib_root(), stdlib_files()
    source = os.path.expanduser(source)
    if is_glob(source):
        matched = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        files = [p for p in matched if _is_table(p) or not _is_binary(p)]
        if not files:
            raise DataError(
                f"the glob {source!r} matches no {'text ' if matched else ''}files; check the pattern "
                "(quote it so the shell does not expand it)"
            )
        _note_skipped(len(matched) - len(files), source)
        return _glob_root(source), files
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"data source {source!r} does not exist; pass a file, folder, glob, .jsonl, "
            ".parquet, or 'stdlib' for the embedded corpus"
        )
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise DataError(
                f"the folder {source!r} holds no readable text files (hidden and binary files are skipped)"
            )
        return path, files
    if not _is_table(path) and _is_binary(path):
        raise DataError(
            f"{source} is a binary file, not text (a NUL byte in its first 8 KiB); pass text files"
        )
    return path.parent, [path]


def _glob_root(pattern: str) -> Path:
    """The fixed directory prefix of a glob: `data/**/*.txt` -> `data`."""
    fixed: list[str] = []
    for part in Path(pattern).parts:
        if any(c in part for c in _GLOB_CHARS):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path()


def _folder_files(root: Path) -> list[Path]:
    files: list[Path] = []
    binary = 0
    for dirpath, dirnames, filenames in os.walk(root):
        # hidden folders (.git, .venv) and caches are never corpus text
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for f in filenames:
            p = Path(dirpath, f)
            if f.startswith("."):
                continue
            if _is_table(p) or not _is_binary(p):
                files.append(p)
            else:
                binary += 1
    _note_skipped(binary, str(root))
    return sorted(files)


def _note_skipped(n: int, where: str) -> None:
    if n:
        print(f"note: {n} binary file{'s' * (n > 1)} in {where} skipped (not text)", file=sys.stderr)


def read_text(path: Path, *, note: bool = True) -> str:
    """A text file's content as UTF-8; bytes that are not valid UTF-8 (a Latin-1 file, say) become U+FFFD,
    with a note saying how many (none for the embedded corpus, whose few legacy-encoded test files are
    known)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        text = data.decode("utf-8", errors="replace")
        if note:
            print(f"note: {path} is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); read with "
                  f"{text.count(chr(0xFFFD))} invalid byte sequences replaced by U+FFFD", file=sys.stderr)  # fmt: skip
        return text


def _is_table(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".parquet")


def _is_binary(path: Path) -> bool:
    # the same heuristic git and grep use: a NUL byte near the start means "not text"
    try:
        with open(path, "rb") as fh:
            return b"\0" in fh.read(8192)
    except OSError:
        return True


def iter_documents(source: str | None) -> Iterator[tuple[str, str]]:
    """(name, text) for every document of `source`, in a deterministic order."""
    root, files = resolve_files(source)
    embedded = source is None or source == STDLIB
    for f in files:
        yield from _file_documents(f, _name(f, root), note=not embedded)


def _name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # a glob like ../x/*.txt: fall back to the path as matched
        return path.as_posix()


def _file_documents(path: Path, name: str, note: bool = True) -> Iterator[tuple[str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_documents(path, name)
    elif suffix == ".parquet":
        yield from _parquet_documents(path, name)
    else:
        try:
            yield name, read_text(path, note=note)
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}") from None


def _jsonl_documents(path: Path, name: str) -> Iterator[tuple[str, str]]:
    try:
        fh = open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    with fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{i} is not valid JSON ({e.msg}); each line of a .jsonl file "
                    'must be one object like {"text": "..."}'
                ) from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise DataError(
                    f"{path}:{i} has no string 'text' field (found {keys}); each line "
                    'must be an object like {"text": "..."}'
                )
            yield f"{name}:{i}", rec["text"]


def _parquet_documents(path: Path, name: str) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path} is not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise DataError(
            f"{path} has no 'text' column (columns: {schema.names}); rename the column "
            "holding the documents to 'text'"
        )
    text_type = schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise DataError(f"{path}: column 'text' has type {text_type}, expected string")
    row = 0
    # record batches stream the file: a large parquet never sits in memory whole
    for batch in pf.iter_batches(columns=["text"], batch_size=4096):
        for t in batch.column(0).to_pylist():
            if t:
                yield f"{name}:{row}", t
            row += 1


def read_jsonl(path: str | Path, fields: dict[str, tuple[type, ...]]) -> list[dict[str, Any]]:
    """Records of a JSONL file; every record must hold `fields` (name -> accepted types)."""
    p = Path(path)
    if not p.exists() or p.is_dir():
        raise DataError(
            f"data file {p} {'is a folder' if p.is_dir() else 'does not exist'}; pass a .jsonl file with "
            f"{'/'.join(fields)} fields (one JSON object per line)"
        )
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{p} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8 "
            "(JSON text is UTF-8)"
        ) from None
    records = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(
                f"{p}:{i + 1} is not valid JSON ({getattr(e, 'msg', e)}); one JSON object per line"
            ) from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{i + 1} is not a JSON object; expected {{{', '.join(fields)}}}")
        for name, types in fields.items():
            # bool is an int in Python, but a true/false label is almost surely a mistake in the file
            if not isinstance(rec.get(name), types) or isinstance(rec.get(name), bool):
                kinds = " or ".join(t.__name__ for t in types)
                raise DataError(f"{p}:{i + 1} needs a {kinds} field {name!r} (got {rec.get(name)!r})")
        records.append(rec)
    if not records:
        raise DataError(f"{p} holds no records")
    return records
