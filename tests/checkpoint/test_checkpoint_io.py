"""Checkpoints: round trip, atomic replacement, recovery after a kill between renames, no pickles."""

import os

import pytest
import torch

import longctx.checkpoint as ck
from longctx import GPT, GPTConfig, load
from longctx.errors import CheckpointError


def model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("tiny", n_layer=1, tie_embeddings=False))


def test_round_trip_identical_logits(tmp_path):
    m = model().eval()
    ck.save_checkpoint(tmp_path / "c", m, trainer_state={"step": 3})
    m2 = load(tmp_path / "c")
    x = torch.randint(0, 260, (1, 20))
    assert torch.equal(m(x), m2(x))
    assert sorted(os.listdir(tmp_path / "c")) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_state.json",
    ]


def test_a_kill_during_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "c"
    ck.save_checkpoint(path, model(0), trainer_state={"step": 1})
    (path / "metrics.jsonl").write_text("{}\n")

    def dying_save(*a, **k):
        raise KeyboardInterrupt  # killed while writing the new weights

    monkeypatch.setattr(ck, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, model(1), trainer_state={"step": 2})
    monkeypatch.undo()
    x = torch.randint(0, 260, (1, 10))
    assert torch.equal(load(path)(x), model(0).eval()(x))
    assert ck.load_trainer_state(path)[0]["step"] == 1


def test_a_kill_between_the_renames_is_recovered(tmp_path):
    path = tmp_path / "c"
    ck.save_checkpoint(path, model(0))
    path.rename(path.with_name("c.old"))  # state right after `path -> c.old`, before `tmp -> path`
    x = torch.randint(0, 260, (1, 10))
    assert torch.equal(load(path)(x), model(0).eval()(x))


def test_run_files_survive_a_save(tmp_path):
    path = tmp_path / "c"
    ck.save_checkpoint(path, model(0))
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    (path / "eval").mkdir()
    (path / "eval" / "results.json").write_text("{}")
    ck.save_checkpoint(path, model(1))
    assert (path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (path / "eval" / "results.json").exists()


def test_optimizer_state_is_loaded_without_unpickling_code(tmp_path):
    path = tmp_path / "c"
    m = model()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randint(0, 260, (1, 8))).sum().backward()
    opt.step()
    ck.save_checkpoint(path, m, optimizer_state={"optimizer": opt.state_dict(), "rng": torch.get_rng_state()})
    _, state = ck.load_trainer_state(path)
    assert state["optimizer"]["state"]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="corrupt"):
        ck.load_trainer_state(path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    path = tmp_path / "c"
    ck.save_checkpoint(path, model())
    GPTConfig.from_preset("tiny", n_layer=2, tie_embeddings=False).save(path / "config.json")
    with pytest.raises(CheckpointError, match="does not match the config"):
        load(path)
