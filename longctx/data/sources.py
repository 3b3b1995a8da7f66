"""Where text comes from. `iter_documents(source)` yields (name, text) in a deterministic order.

Sources: None / "stdlib" (the running Python's standard-library .py files — the embedded default corpus),
a file, a folder, a glob, a `.jsonl` file (one `text` field per line) or a `.parquet` file (a `text`
column). The train/validation split is by document, so no file is in both.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from longctx.errors import DataError

STDLIB = "stdlib"


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise DataError(f"no .py files under {root}: this Python has no standard-library sources; "
                        "pass --data with your own text")
    return files


def is_validation(name: str, val_fraction: float) -> bool:
    """Deterministic split by document name (a hash, so adding files does not reshuffle the others)."""
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < val_fraction


def iter_documents(source: str | None) -> Iterator[tuple[str, str]]:
    if source is None or source == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        for p in stdlib_files():
            yield str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")
        return
    path = Path(source)
    if any(ch in source for ch in "*?[") and not path.exists():
        files = sorted(Path().glob(source)) if not path.is_absolute() else sorted(
            Path(path.anchor).glob(str(path.relative_to(path.anchor))))
        if not files:
            raise DataError(f"the glob {source!r} matches no files")
        for f in files:
            yield from _file_documents(f)
        return
    if not path.exists():
        raise DataError(f"data source {source!r} does not exist; pass a file, folder, glob, .jsonl, "
                        ".parquet, or 'stdlib' for the embedded corpus")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"the folder {source!r} holds no files")
        for f in files:
            yield from _file_documents(f)
        return
    yield from _file_documents(path)


def _file_documents(path: Path) -> Iterator[tuple[str, str]]:
    if path.suffix == ".jsonl":
        import json

        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i + 1} is not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(f"{path}:{i + 1} has no string 'text' field")
                yield f"{path}:{i + 1}", rec["text"]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise DataError(f"{path} has no 'text' column (columns: {table.column_names})")
        for i, t in enumerate(table.column("text").to_pylist()):
            if t:
                yield f"{path}:{i}", str(t)
    else:
        yield str(path), path.read_text(encoding="utf-8", errors="replace")
