"""Shared fixtures: small corpora and tiny checkpoints, built locally (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token cache for the whole session, so the corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A folder of real text: a slice of the standard library (a few hundred KB), split into files."""
    from longctx.data.sources import stdlib_files

    d = tmp_path_factory.mktemp("corpus")
    for i, f in enumerate(stdlib_files()[:60]):
        (d / f"doc{i:03d}.txt").write_text(f.read_text(encoding="utf-8", errors="replace"))
    return str(d)
