"""Tokenize a source once into a memory-mapped token file, so a large corpus streams from disk.

Layout: `<cache_dir>/<key>/{train,val}.bin` (uint16 or uint32 token ids, every document followed by the
tokenizer's eos id) plus `meta.json`. The key hashes the source's files (paths, sizes, mtimes), the
tokenizer and the split fraction, so a changed corpus or tokenizer is re-tokenized and an unchanged one
never is.

Safety: a build writes into a private temporary folder and renames it to `<key>` only when complete
(`meta.json` last), so a killed build is never read; concurrent builders of one key take a file lock, and
the second one waits and then reuses the first one's result instead of tokenizing again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from longctx.data.sources import STDLIB, is_validation, iter_documents, resolve_files
from longctx.data.tokenizer import ByteTokenizer, Tokenizer
from longctx.errors import DataError

DEFAULT_CACHE = Path(os.environ.get("LONGCTX_CACHE", Path.home() / ".cache" / "longctx"))
CACHE_VERSION = 2  # bump when the file layout or the split rule changes
_BATCH_CHARS = 4_000_000  # text per encode_batch call: big enough to keep the Rust threads busy


def cache_key(source: str | None, tokenizer: Tokenizer, val_fraction: float) -> str:
    """16 hex digits naming one (source contents, tokenizer, split) combination."""
    h = hashlib.sha1()
    h.update(
        f"v{CACHE_VERSION}|{source or STDLIB}|{val_fraction}|{type(tokenizer).__name__}|"
        f"{tokenizer.vocab_size}|{tokenizer.eos_id}".encode()
    )
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if callable(fingerprint):
        h.update(fingerprint().encode())
    _, files = resolve_files(source)  # raises DataError for a missing path before anything is created
    for f in files:
        st = f.stat()
        h.update(f"{f.absolute()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def token_file(
    source: str | None,
    tokenizer: Tokenizer,
    split: str = "train",
    *,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.05,
) -> np.ndarray:
    """Token ids of `split` ("train" or "val") as a read-only memmap; tokenizes on the first call."""
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(cache_dir or DEFAULT_CACHE) / cache_key(source, tokenizer, val_fraction)
    if not (root / "meta.json").exists():
        _build_once(source, tokenizer, root, val_fraction)
    meta = json.loads((root / "meta.json").read_text())
    n = meta[f"{split}_tokens"]
    if n == 0:
        raise DataError(
            f"the {split} split of {source or STDLIB!r} is empty ({meta['documents']} "
            "documents); add more text or change val_fraction"
        )
    path = root / f"{split}.bin"
    if path.stat().st_size != n * np.dtype(meta["dtype"]).itemsize:
        raise DataError(
            f"the token cache {path} does not match its meta.json (damaged?); delete {root} and it is rebuilt"
        )
    return np.memmap(path, dtype=meta["dtype"], mode="r")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the atomic rename still keeps partial builds unread
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_once(source: str | None, tokenizer: Tokenizer, root: Path, val_fraction: float) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(root.with_name(root.name + ".lock")):
        if (root / "meta.json").exists():  # another process built it while we waited for the lock
            return
        # holding the lock, no one else is building this key: leftovers are from killed builds
        for stale in root.parent.glob(root.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if root.exists():  # a folder without meta.json is not ours to trust
            shutil.rmtree(root)
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
        try:
            _write(source, tokenizer, tmp, val_fraction)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _write(source: str | None, tokenizer: Tokenizer, out: Path, val_fraction: float) -> None:
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
    eos = np.array([tokenizer.eos_id], dtype=dtype).tobytes()
    counts = {"train": 0, "val": 0}
    docs = 0
    with open(out / "train.bin", "wb") as ftr, open(out / "val.bin", "wb") as fva:
        files = {"train": ftr, "val": fva}
        for name, ids in _encoded_documents(source, tokenizer, dtype):
            split = "val" if is_validation(name, val_fraction) else "train"
            files[split].write(ids.tobytes() + eos)
            counts[split] += len(ids) + 1
            docs += 1
    if docs == 0:
        raise DataError(f"the corpus {source or STDLIB!r} is empty: no document has any text")
    rule = "by-document"
    if val_fraction > 0 and 0 in counts.values():
        counts = _tail_split(out, counts, dtype, val_fraction)
        rule = "tail"
    meta = {
        "source": source or STDLIB,
        "dtype": dtype.name,
        "documents": docs,
        "split": rule,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "eos_id": tokenizer.eos_id,
        "tokenizer": type(tokenizer).__name__,
        "vocab_size": tokenizer.vocab_size,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))  # last: its presence means "complete"


def _encoded_documents(
    source: str | None, tokenizer: Tokenizer, dtype: np.dtype
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, ids) per non-blank document, in source order."""
    docs = ((name, text) for name, text in iter_documents(source) if text.strip())
    bar = tqdm(docs, desc="tokenizing", unit="doc", leave=False)
    if isinstance(tokenizer, ByteTokenizer):
        for name, text in bar:
            yield name, tokenizer.encode_array(text).astype(dtype, copy=False)
    elif hasattr(tokenizer, "encode_batch"):
        # batches of documents: the Rust tokenizer encodes a batch on all cores
        batch: list[tuple[str, str]] = []
        size = 0
        for name, text in bar:
            batch.append((name, text))
            size += len(text)
            if size >= _BATCH_CHARS:
                yield from _encode_batch(tokenizer, batch, dtype)
                batch, size = [], 0
        yield from _encode_batch(tokenizer, batch, dtype)
    else:
        for name, text in bar:
            yield name, np.asarray(tokenizer.encode(text), dtype=dtype)


def _encode_batch(
    tokenizer: Any, batch: list[tuple[str, str]], dtype: np.dtype
) -> Iterator[tuple[str, np.ndarray]]:
    if not batch:
        return
    # special strings in corpus text stay text: the only eos ids in the cache are our separators
    encoded = tokenizer.encode_batch([t for _, t in batch], special_tokens=False)
    for (name, _), ids in zip(batch, encoded):
        yield name, np.asarray(ids, dtype=dtype)


def _tail_split(out: Path, counts: dict[str, int], dtype: np.dtype, val_fraction: float) -> dict[str, int]:
    """Too few documents to split by name (one big file, say): the last val_fraction of the token stream
    becomes the validation split instead."""
    if counts["train"] == 0:
        os.replace(out / "val.bin", out / "train.bin")
        (out / "val.bin").touch()
    total = counts["train"] + counts["val"]
    n_val = max(1, int(total * val_fraction))
    if total - n_val < 2:
        return {"train": total, "val": 0}  # too small to split at all; token_file reports the empty split
    stream = np.memmap(out / "train.bin", dtype=dtype, mode="r")
    stream[total - n_val :].tofile(out / "val.bin")
    del stream  # release the map before truncating the file under it
    os.truncate(out / "train.bin", (total - n_val) * dtype.itemsize)
    return {"train": total - n_val, "val": n_val}
