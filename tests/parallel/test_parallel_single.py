"""Context-parallel pieces that need no process group: the zigzag split, argument checks, one-process setup."""

from __future__ import annotations

import pytest
import torch

from longctx import parallel
from longctx.attention import attention
from longctx.config import GPTConfig
from longctx.errors import ConfigError
from longctx.model import GPT


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_covers_every_token_once_and_balances_causal_work(cp):
    T = 8 * cp
    shards = [parallel.zigzag_indices(T, cp, r) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(shards)).values, torch.arange(T))
    # causal work of a token = its index + 1 keys: equal on every rank
    work = {int((s + 1).sum()) for s in shards}
    assert len(work) == 1


def test_shard_batch_keeps_positions_and_labels_aligned():
    ids = torch.arange(16).expand(2, 16)
    local = parallel.shard_batch({"input_ids": ids, "labels": ids + 1}, cp=2, cp_rank=1)
    want = torch.tensor([4, 5, 6, 7, 8, 9, 10, 11])
    assert torch.equal(local["input_ids"][0], want)
    assert torch.equal(local["position_ids"][1], want)  # made explicit: rank 1 does not start at 0
    assert torch.equal(local["labels"][0], want + 1)


def test_bad_length_names_length_and_multiple():
    with pytest.raises(ConfigError, match="length is 30.*multiple of 8"):
        parallel.zigzag_indices(30, 4, 0)


def test_one_process_setup_is_a_no_op():
    setup = parallel.init(1, 1, "cpu")
    model = GPT(GPTConfig.from_preset("tiny"))
    assert setup.wrap_model(model) is model
    batch = {"input_ids": torch.zeros(1, 6, dtype=torch.long)}
    with setup.context(batch) as local:
        assert local is batch
    loss = torch.tensor(2.0)
    assert setup.reduce_loss(loss, torch.zeros(1, 6)) is loss
    assert setup.batch_index(3, 1, 2) == 7  # the trainer's own index: step * grad_accum + micro


def test_world_size_mismatch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(
        ConfigError, match="needs 4 processes but 1 were started.*torchrun --nproc-per-node 4"
    ):
        parallel.init(2, 2, "cpu")


def test_ring_backend_outside_a_step_is_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ConfigError, match="context-parallel step"):
        attention(q, q, q, backend="ring")


def test_length_dependent_rope_and_dropout_refused_for_cp():
    setup = parallel.ParallelSetup(cp=2, world_size=2)
    dyn = GPT(GPTConfig.from_preset("tiny", rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ConfigError, match="dynamic"):
        setup.check_model(dyn)
    with pytest.raises(ConfigError, match="dropout=0"):
        setup.check_model(GPT(GPTConfig.from_preset("tiny", dropout=0.1)))
    with pytest.raises(ConfigError, match="--dp-mode"):
        setup.wrap_model(GPT(GPTConfig.from_preset("tiny")), mode="zero")
