"""Tiny base checkpoints (random weights, saved locally) and synthetic task files for the task tests."""

from __future__ import annotations

import pytest
import torch

from longctx.checkpoint import save_checkpoint
from longctx.config import GPTConfig
from longctx.data.synthetic_tasks import key_classification, key_qa, write_jsonl
from longctx.model import GPT

TINY = dict(vocab_size=260, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=128)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))


@pytest.fixture
def make_model():
    """make_model(seed=0, **config overrides) -> a tiny random GPT (2 layers, d=32)."""
    return tiny_model


@pytest.fixture(scope="session")
def decoder_ckpt(tmp_path_factory):
    return str(save_checkpoint(tmp_path_factory.mktemp("base") / "decoder", tiny_model()))


@pytest.fixture(scope="session")
def key_files(tmp_path_factory):
    """The long-dependency classification task: 64-character documents, the key in the first sentence."""
    d = tmp_path_factory.mktemp("keycls")
    return (
        str(write_jsonl(key_classification(128, 64, seed=0), d / "train.jsonl")),
        str(write_jsonl(key_classification(64, 64, seed=1), d / "eval.jsonl")),
    )


@pytest.fixture(scope="session")
def qa_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("keyqa")
    return (
        str(write_jsonl(key_qa(32, 80, seed=0), d / "train.jsonl")),
        str(write_jsonl(key_qa(4, 80, seed=1), d / "eval.jsonl")),
    )
