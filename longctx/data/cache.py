"""Tokenize a source once into a memory-mapped token file, so a large corpus streams from disk.

Layout: `<cache_dir>/<key>/{train,val}.bin` (uint16 or uint32 token ids, documents separated by the
tokenizer's eos id) plus `meta.json`. The key hashes the source, its file sizes/mtimes and the tokenizer,
so a changed corpus or tokenizer is re-tokenized and an unchanged one never is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from longctx.data.sources import STDLIB, is_validation, iter_documents
from longctx.data.tokenizer import ByteTokenizer, Tokenizer
from longctx.errors import DataError

DEFAULT_CACHE = Path(os.environ.get("LONGCTX_CACHE", Path.home() / ".cache" / "longctx"))


def _fingerprint(source: str | None, tokenizer: Tokenizer, val_fraction: float) -> str:
    h = hashlib.sha1()
    h.update(f"{source or STDLIB}|{val_fraction}|{type(tokenizer).__name__}|{tokenizer.vocab_size}".encode())
    if source in (None, STDLIB):
        import sys

        h.update(sys.version.encode())
    else:
        p = Path(source)
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []
        for f in files:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    if hasattr(tokenizer, "fingerprint"):
        h.update(tokenizer.fingerprint().encode())
    return h.hexdigest()[:16]


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode_array(text)
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def token_file(source: str | None, tokenizer: Tokenizer, split: str = "train", *,
               cache_dir: str | Path | None = None, val_fraction: float = 0.05) -> np.ndarray:
    """Token ids of `split` ("train" or "val") as a read-only memmap; tokenizes on the first call."""
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(cache_dir or DEFAULT_CACHE) / _fingerprint(source, tokenizer, val_fraction)
    if not (root / "meta.json").exists():
        _build(source, tokenizer, root, val_fraction)
    meta = json.loads((root / "meta.json").read_text())
    if meta[f"{split}_tokens"] == 0:
        raise DataError(f"the {split} split of {source or STDLIB!r} is empty "
                        f"({meta['documents']} documents); add more text or change val_fraction")
    return np.memmap(root / f"{split}.bin", dtype=meta["dtype"], mode="r")


def _build(source: str | None, tokenizer: Tokenizer, root: Path, val_fraction: float) -> None:
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "val": 0}
    docs = 0
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    with open(tmp / "train.bin", "wb") as ftr, open(tmp / "val.bin", "wb") as fva:
        for name, text in tqdm(iter_documents(source), desc="tokenizing", unit="doc", leave=False):
            if not text.strip():
                continue
            ids = _encode(tokenizer, text).astype(dtype)
            split = "val" if is_validation(name, val_fraction) else "train"
            (fva if split == "val" else ftr).write(ids.tobytes() + eos.tobytes())
            counts[split] += len(ids) + 1
            docs += 1
    if docs == 0:
        raise DataError(f"the corpus {source or STDLIB!r} is empty: no document has any text")
    meta = {"source": source or STDLIB, "dtype": np.dtype(dtype).name, "documents": docs,
            "train_tokens": counts["train"], "val_tokens": counts["val"], "eos_id": tokenizer.eos_id}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if root.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp)
        return
    tmp.rename(root)
