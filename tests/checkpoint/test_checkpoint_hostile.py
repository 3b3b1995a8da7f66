"""Checkpoints, configs and data as a hostile user leaves them: a save killed at any step loses nothing and
resumes; killed saves leave no litter; malformed configs, truncated weights, pickles, binary and
non-UTF-8 data are one line (exit 2) naming the file and what is wrong."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longctx.checkpoint as ck
from longctx import GPT, GPTConfig
from longctx.cli import main
from longctx.data.tokenizer import ByteTokenizer
from longctx.train.trainer import ModelCheckpoint


def model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("tiny", n_layer=1, d_model=32, n_head=2, d_ff=64))


def _err(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


class Killed(BaseException):
    """A kill -9 at a given moment: nothing catches it."""


def _faulty(monkeypatch, fail_at: int) -> list[str]:
    """Every file-system step of a save counts; the `fail_at`-th raises Killed."""
    calls: list[str] = []

    def wrap(name, fn):
        def step(*a, **kw):
            calls.append(name)
            if len(calls) == fail_at:
                raise Killed(name)
            return fn(*a, **kw)

        return step

    monkeypatch.setattr(ck, "save_file", wrap("save_file", ck.save_file))
    monkeypatch.setattr(ck.torch, "save", wrap("torch.save", torch.save))
    monkeypatch.setattr(ck.os, "fsync", wrap("fsync", os.fsync))
    monkeypatch.setattr(ck.os, "link", wrap("link", os.link))
    monkeypatch.setattr(ck.shutil, "rmtree", wrap("rmtree", shutil.rmtree))
    monkeypatch.setattr(ck.Path, "rename", wrap("rename", Path.rename))
    return calls


def test_a_save_killed_at_each_step_loses_nothing(tmp_path, monkeypatch):
    x = torch.randint(0, 260, (1, 12))
    want = {step: model(step).eval()(x).detach() for step in (1, 2, 3)}
    n, completed = 0, False
    while not completed:
        n += 1
        path = tmp_path / f"run{n}"
        ck.save_checkpoint(path, model(1), trainer_state={"step": 1}, optimizer_state={"rng": torch.ones(1)})
        (path / "metrics.jsonl").write_text('{"step": 1}\n')  # a run file the save must carry over
        with monkeypatch.context() as m:
            calls = _faulty(m, n)
            try:
                ck.save_checkpoint(
                    path, model(2), trainer_state={"step": 2}, optimizer_state={"rng": torch.ones(1)}
                )
                completed = True
            except Killed:
                pass
        # whatever moment it died at: one whole checkpoint, its trainer state matching its weights
        got = ck.load_model(path).eval()(x).detach()
        step = ck.load_trainer_state(path)[0]["step"]
        assert torch.equal(got, want[step]), (n, calls[-1])
        assert (path / "metrics.jsonl").exists()
        restored = ModelCheckpoint(path, ByteTokenizer(), resume=True).restore(model(0))
        assert restored is not None and restored[0]["step"] == step
        # the next save goes through and cleans up after the killed one
        ck.save_checkpoint(path, model(3), trainer_state={"step": 3})
        assert torch.equal(ck.load_model(path).eval()(x).detach(), want[3])
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f"run{n}")) == [f"run{n}"], n
    assert n > 8  # every step of the save was hit once


def test_resume_recovers_the_checkpoint_set_aside(tmp_path, small_corpus, cache_dir):
    """The state a kill between the two renames leaves (`cp -a RUN RUN.old; rm -rf RUN`): --resume goes on
    from the saved step, it does not start again at 0 (and delete RUN.old)."""
    from longctx.train.pretrain import TrainArgs, train

    def args(**kw):
        base = dict(
            preset="tiny", data=small_corpus, cache_dir=cache_dir, seq_len=32, batch_size=2, steps=4,
            save_every=2, out=str(tmp_path / "run"), quiet=True, eval_batches=1,
            config_overrides={"n_layer": 1, "d_model": 32, "n_head": 2, "d_ff": 64},
        )  # fmt: skip
        return TrainArgs.from_flat(**{**base, **kw})

    train(args(steps=2))
    run = tmp_path / "run"
    shutil.copytree(run, tmp_path / "run.old")
    shutil.rmtree(run)
    resumed = train(args(resume=True))
    assert [h["step"] for h in resumed.history if "loss" in h] == [3, 4]


def test_killed_exports_leave_no_litter(tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    (tmp_path / "m.gguf.tmp-999999").write_bytes(b"left by a killed export")  # no such process
    (tmp_path / "hf.tmp-999999").mkdir()
    ck.export_to_gguf(model(0), out)
    ck.export_to_hf(model(0), tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]


BAD_CONFIGS = [
    ({"n_layer": "four"}, "'n_layer' must be an integer"),
    ({"n_layer": 2.5}, "'n_layer' must be an integer"),
    ({"n_layer": None}, "'n_layer' must be an integer"),
    ({"n_layer": [4]}, "'n_layer' must be an integer"),
    ({"rope_theta": "big"}, "'rope_theta' must be a number"),
    ({"tie_embeddings": "yes"}, "'tie_embeddings' must be true or false"),
    ({"extra": [1, 2]}, "'extra' must be an object"),
    ({"rope_scaling": "yarn"}, "'rope_scaling' must be an object"),
    ({"d_model": -64}, "d_model"),
]


@pytest.mark.parametrize(("change", "needle"), BAD_CONFIGS, ids=range(len(BAD_CONFIGS)))
def test_a_malformed_config_names_file_and_field(tmp_path, capsys, change, needle):
    path = ck.save_checkpoint(tmp_path / "c", model(0))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    for command in (["info", str(path)], ["generate", str(path), "--prompt", "x", "--max-tokens", "1"]):
        assert main(command) == 2
        err = _err(capsys)
        assert needle in err and "config.json" in err, err


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe{", "not valid JSON"),
        (b"{}", "lacks 'vocab_size'"),
        (b'{"model_type": "longctx", "n_head": 2}', "lacks 'vocab_size', 'n_layer'"),
    ],  # fmt: skip
)
def test_a_config_that_is_no_config(tmp_path, capsys, content, needle):
    path = ck.save_checkpoint(tmp_path / "c", model(0))
    (path / "config.json").write_bytes(content)
    assert main(["info", str(path)]) == 2
    assert needle in _err(capsys)


@pytest.mark.parametrize("damage", ["truncate", "empty", "random", "other shapes"])
def test_info_checks_the_weights_without_loading_them(tmp_path, capsys, damage):
    path = ck.save_checkpoint(tmp_path / "c", model(0))
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "random":
        weights.write_bytes(os.urandom(len(data)))
    else:
        ck.save_checkpoint(tmp_path / "w", model(0).__class__(model(0).config.replace(d_ff=96)))
        shutil.copy(tmp_path / "w" / "model.safetensors", weights)
    assert main(["info", str(path)]) == 2
    assert "model.safetensors" in _err(capsys) or damage == "other shapes"


def test_a_pickle_is_refused_in_one_line(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    hf = tmp_path / "hf"
    ck.export_to_hf(model(0), hf)
    (hf / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Evil()}, hf / "pytorch_model.bin")
    assert main(["generate", str(hf), "--prompt", "x", "--max-tokens", "1"]) == 2
    err = _err(capsys)
    assert "refused to unpickle" in err and "safetensors" in err and "weights_only" not in err


def test_bad_data_is_named(tmp_path, capsys, cache_dir):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(os.urandom(4096) + b"\0")
    common = ["--preset", "tiny", "--steps", "1", "--seq-len", "16", "--batch-size", "1", "--quiet",
              "--cache-dir", cache_dir, "--set", "n_layer=1"]  # fmt: skip
    assert main(["train", "--data", str(binary), "--out", str(tmp_path / "r"), *common]) == 2
    assert "binary" in _err(capsys)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 na\xefve r\xe9sum\xe9 -- ".encode("latin-1") * 200)
    assert main(["train", "--data", str(latin), "--out", str(tmp_path / "r2"), *common]) == 0
    assert "latin.txt is not UTF-8" in capsys.readouterr().err
    ckpt = ck.save_checkpoint(tmp_path / "base", model(0))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes('{"text": "caf\xe9", "label": "a"}\n'.encode("latin-1"))
    for data, needle in ((jsonl, "not UTF-8"), (tmp_path, "is a folder")):
        assert main(["finetune", str(ckpt), "--task", "classify", "--data", str(data), "--out",
                     str(tmp_path / "ft"), "--steps", "1", "--quiet"]) == 2  # fmt: skip
        assert needle in _err(capsys)


def test_info_into_a_closed_pipe_is_quiet(tmp_path):
    path = ck.save_checkpoint(tmp_path / "c", model(0))
    cmd = f"{sys.executable} -m longctx info {path} | head -1"
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "{" and "Error" not in r.stderr, r.stderr
