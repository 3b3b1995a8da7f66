"""Shared fixtures: small corpora and tiny checkpoints, built locally (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

# `--precision auto` / `--dtype auto` pick bf16 on CPUs with native bf16: the default test run computes the
# same numbers on both CPU kinds (tests/train/test_precision_auto.py checks the choice itself)
os.environ.setdefault("LONGCTX_AUTO_PRECISION", "fp32")

# Test models are tiny: per-op work is microseconds, and OpenMP thread hand-offs cost more than the math
# (badly so on a busy 2-core machine). One thread is faster and steadier; benchmarks set their own.
torch.set_num_threads(1)


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
