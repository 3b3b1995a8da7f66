"""Training: the loss falls, resume reproduces the uninterrupted run, the curriculum switches on time."""

import json

import pytest

from longctx.errors import ConfigError
from longctx.train.pretrain import TrainArgs, train
from longctx.train.schedules import Curriculum, lr_at


def args(tmp_path, corpus, cache, **kw) -> TrainArgs:
    base = dict(
        preset="tiny",
        data=corpus,
        cache_dir=cache,
        seq_len=64,
        batch_size=4,
        steps=12,
        lr=3e-3,
        warmup=2,
        out=str(tmp_path / "run"),
        quiet=True,
        eval_batches=2,
        config_overrides={"n_layer": 2, "d_model": 64, "n_head": 2, "d_ff": 128},
    )
    base.update(kw)
    return TrainArgs.from_flat(**base)


def test_loss_falls_well_below_its_start(tmp_path, small_corpus, cache_dir):
    r = train(args(tmp_path, small_corpus, cache_dir, steps=40))
    losses = [h["loss"] for h in r.history if "loss" in h]
    assert losses[0] > 5.0  # ~ln(260) for an untrained byte model
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]
    assert r.final_val_loss is not None and r.final_val_loss < 0.75 * losses[0]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    assert {"step", "loss", "lr", "seq_len", "tokens_per_s", "peak_mem_mb", "eta_s"} <= set(rec)


def test_resume_continues_the_same_loss_curve(tmp_path, small_corpus, cache_dir):
    common = dict(
        steps=10, config_overrides={"n_layer": 2, "d_model": 64, "n_head": 2, "d_ff": 128, "dropout": 0.1}
    )
    full = train(args(tmp_path / "a", small_corpus, cache_dir, **common))
    # the same 10-step run, killed right after its step-4 checkpoint, then resumed
    part = args(tmp_path / "d", small_corpus, cache_dir, **{**common, "steps": 10, "save_every": 4})
    part_run = _run_until(part, stop_after=4)
    resumed = train(args(tmp_path / "d", small_corpus, cache_dir, **{**common, "resume": True}))
    curve = [h["loss"] for h in part_run] + [h["loss"] for h in resumed.history]
    assert curve == [h["loss"] for h in full.history]


def _run_until(a: TrainArgs, stop_after: int):
    """Run `a` and simulate a kill right after the checkpoint at step `stop_after`."""
    import longctx.train.pretrain as pretrain
    import longctx.train.trainer as trainer

    class Killed(Exception):
        pass

    history = []
    real_save = trainer.save_checkpoint

    def save_then_die(*x, **kw):
        real_save(*x, **kw)
        if kw["trainer_state"]["step"] == stop_after:
            raise Killed

    trainer.save_checkpoint = save_then_die
    try:
        pretrain.train(a)
    except Killed:
        pass
    finally:
        trainer.save_checkpoint = real_save
    for line in (trainer.Path(a.loop.out) / "metrics.jsonl").read_text().splitlines():
        history.append(json.loads(line))
    return history


def test_curriculum_changes_length_at_the_right_steps(tmp_path, small_corpus, cache_dir):
    r = train(
        args(
            tmp_path,
            small_corpus,
            cache_dir,
            steps=6,
            seq_len=64,
            batch_size=4,
            seq_len_schedule="16:0,32:2,64:4",
        )
    )
    steps = [h for h in r.history if "loss" in h]
    assert [h["seq_len"] for h in steps] == [16, 16, 32, 32, 64, 64]
    assert [h["batch_size"] for h in steps] == [16, 16, 8, 8, 4, 4]
    assert {h["tokens"] for h in steps} == {256}
    events = [h for h in r.history if h.get("event") == "seq_len_change"]
    assert [(e["step"], e["seq_len"]) for e in events] == [(2, 32), (4, 64)]


def test_curriculum_parsing_errors():
    with pytest.raises(ConfigError, match="start at step 0"):
        Curriculum.parse("128:10,256:100", 256, 4)
    with pytest.raises(ConfigError, match="LEN:STEP"):
        Curriculum.parse("128-0", 256, 4)


def test_lr_schedule_warmup_then_cosine():
    vals = [lr_at(s, lr=1.0, warmup=10, total=110, min_ratio=0.1) for s in range(110)]
    assert vals[0] == pytest.approx(0.1) and vals[9] == pytest.approx(1.0)
    assert vals[60] == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-6)  # half way through the cosine
    assert all(a >= b for a, b in zip(vals[10:], vals[11:]))


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_other_optimizers_run(tmp_path, small_corpus, cache_dir, opt):
    r = train(args(tmp_path, small_corpus, cache_dir, steps=3, optimizer=opt, grad_accum=2))
    assert len([h for h in r.history if "loss" in h]) == 3


def test_early_stopping(tmp_path, small_corpus, cache_dir):
    # lr so small nothing improves: patience 2 stops after the third evaluation
    r = train(
        args(
            tmp_path,
            small_corpus,
            cache_dir,
            steps=50,
            lr=1e-9,
            warmup=0,
            eval_every=2,
            early_stop_patience=2,
        )
    )
    assert r.stopped_early and r.history[-1]["step"] == 6


def test_checkpointing_auto_picks_the_fastest_that_fits(tmp_path, small_corpus, cache_dir):
    """--checkpointing auto asks the planner: a roomy budget trains without checkpointing, a tight one
    checkpoints every block, an impossible one is an error naming the fix; without --memory it is refused."""
    from longctx.config import GPTConfig
    from longctx.train.planner import choose_checkpointing, parse_bytes, plan_memory
    from longctx.train.spec import StepShape

    config = GPTConfig.from_preset("base")
    assert choose_checkpointing(StepShape(config, 4096), parse_bytes("20GiB")) == "none"
    lean = plan_memory(StepShape(config, 16384, checkpointing="all")).total
    assert plan_memory(StepShape(config, 16384, checkpointing="every:2")).total > lean
    assert choose_checkpointing(StepShape(config, 16384), lean) == "all"
    with pytest.raises(ConfigError, match="raise --memory"):
        choose_checkpointing(StepShape(config, 16384), lean - 1)
    with pytest.raises(ConfigError, match="--checkpointing auto needs --memory"):
        args(tmp_path, small_corpus, cache_dir, checkpointing="auto").validate()

    tiny = GPTConfig.from_preset("tiny", n_layer=2, d_model=64, n_head=2, d_ff=128, vocab_size=260)
    between = (
        plan_memory(StepShape(tiny, 64, 4, "none")).total + plan_memory(StepShape(tiny, 64, 4, "all")).total
    ) // 2
    for budget, expected in (("64GiB", "none"), (str(between), "all")):
        run = tmp_path / f"run-{expected}"
        train(
            args(
                tmp_path, small_corpus, cache_dir, steps=2, checkpointing="auto", memory=budget, out=str(run)
            )
        )
        assert json.loads((run / "train_args.json").read_text())["checkpointing"] == expected


def test_seq_len_auto_plans_with_the_loss_chunk_it_trains_with():
    """--seq-len auto must count the logits buffer of the loss chunk actually used: a larger chunk leaves
    less room, so the planned length is shorter (it was planned with the default chunk whatever was asked)."""
    from longctx.config import GPTConfig
    from longctx.train.planner import plan_memory
    from longctx.train.pretrain import resolve_shape
    from longctx.train.spec import StepShape

    config = GPTConfig.from_preset("base")
    small, large = (
        resolve_shape(
            StepShape(config, 1, loss_chunk_size=chunk), auto_length=True, checkpointing="all", memory="4GiB"
        )
        for chunk in (1024, 16384)
    )
    assert large.seq_len < small.seq_len and large.loss_chunk_size == 16384
    assert (
        plan_memory(large).total <= 4 * 2**30 < plan_memory(large.replace(seq_len=large.seq_len + 256)).total
    )
