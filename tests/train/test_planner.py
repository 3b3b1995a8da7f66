"""The memory planner against measured peak RSS (fresh subprocesses), and the `longctx plan` command."""

from __future__ import annotations

import json

import pytest

from longctx.cli import main
from longctx.config import GPTConfig
from longctx.errors import ConfigError
from longctx.train.planner import max_seq_len_for_memory, measure_steps, parse_bytes, plan_memory
from longctx.train.spec import StepShape

# (preset, seq_len, checkpointing): two presets, lengths where activations are a large share, on and off
GRID = [("tiny", 2048, "none"), ("tiny", 4096, "all"), ("small", 1024, "none"), ("small", 2048, "all")]


def test_prediction_within_15_percent_of_measured_peak_rss():
    runs = [StepShape(GPTConfig.from_preset(p, max_seq_len=L), L, checkpointing=ck) for p, L, ck in GRID]
    measured = measure_steps(runs, steps=2, threads=1)
    for (p, L, ck), m in zip(GRID, measured):
        pred = plan_memory(StepShape(GPTConfig.from_preset(p), L, 1, ck)).total
        assert abs(pred / m["peak_rss"] - 1) <= 0.15, (p, L, ck, pred, m["peak_rss"])


def test_breakdown_grows_as_expected():
    config = GPTConfig.from_preset("base")
    short, long = plan_memory(StepShape(config, 1024)), plan_memory(StepShape(config, 8192))
    assert short.breakdown["weights"] == long.breakdown["weights"] == 4 * GPT_BASE_PARAMS()
    assert long.breakdown["activations"] > 7 * short.breakdown["activations"]
    assert long.moment == "loss (end of forward)" and long.breakdown["gradients"] == 0
    ck = plan_memory(StepShape(config, 8192, checkpointing="all"))
    assert ck.total < long.total and ck.breakdown["activations"] < long.breakdown["activations"] / 2
    sgd = plan_memory(StepShape(config, 8192, optimizer="sgd")).breakdown["optimizer state"]
    assert sgd == long.breakdown["optimizer state"] // 2  # momentum only vs exp_avg + exp_avg_sq
    assert plan_memory(StepShape(config, 8192, precision="bf16")).total < long.total
    plain = plan_memory(StepShape(config, 8192, loss_chunk_size=None))
    assert plain.breakdown["loss workspace"] > 8 * long.breakdown["loss workspace"]


def GPT_BASE_PARAMS() -> int:
    from longctx.model import GPT

    return GPT(GPTConfig.from_preset("base", n_layer=8)).num_parameters()


def test_max_seq_len_is_the_longest_that_fits():
    config = GPTConfig.from_preset("base")
    budget = parse_bytes("20GiB")
    n = max_seq_len_for_memory(StepShape(config, 1, checkpointing="all"), budget)
    assert n > 0 and n % 256 == 0
    assert plan_memory(StepShape(config, n, checkpointing="all")).total <= budget
    assert plan_memory(StepShape(config, n + 256, checkpointing="all")).total > budget
    assert max_seq_len_for_memory(StepShape(config, 1, checkpointing="all"), parse_bytes("100MiB")) == 0


def test_parse_bytes():
    assert parse_bytes("20GiB") == 20 * 2**30 and parse_bytes("512M") == 512 * 2**20
    assert parse_bytes("1.5 KiB") == 1536 and parse_bytes("1000") == 1000
    with pytest.raises(ConfigError, match="memory size"):
        parse_bytes("lots")


def test_plan_command(capsys):
    assert main(["plan", "--preset", "base", "--seq-len", "32768", "--checkpointing", "all"]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "gradients", "optimizer state", "activations", "loss workspace", "total"):
        assert part in out
    assert main(["plan", "--preset", "base", "--memory", "20GiB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_seq_len"] == max_seq_len_for_memory(
        StepShape(GPTConfig.from_preset("base"), 1, 1, "all"), 20 * 2**30
    )
    assert main(["plan", "--preset", "base"]) == 2  # neither --seq-len nor --memory: one-line error
