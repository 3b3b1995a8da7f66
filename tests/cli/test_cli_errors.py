"""Bad input ends in one line that names the problem, a non-zero exit, and no traceback."""

import subprocess
import sys

import pytest
import torch

from longctx import GPT, GPTConfig
from longctx.checkpoint import save_checkpoint


def longctx(*argv, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "longctx", *argv], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def assert_one_line_error(r, needle):
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    assert needle in err, err
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1
    assert "usage:" not in err, err  # not argparse's usage block above it


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    torch.manual_seed(0)
    save_checkpoint(d, GPT(GPTConfig.from_preset("tiny", n_layer=1)))
    return d


def test_unknown_preset(tmp_path):
    r = longctx("train", "--preset", "huge", "--steps", "1", "--out", str(tmp_path / "r"))
    assert_one_line_error(r, "unknown preset 'huge'")


def test_unknown_position_type(tmp_path):
    r = longctx("train", "--position", "xpos", "--steps", "1", "--out", str(tmp_path / "r"))
    assert_one_line_error(r, "unknown position type 'xpos'")


def test_missing_data_path(tmp_path):
    r = longctx("train", "--data", str(tmp_path / "nope.txt"), "--steps", "1", "--out", str(tmp_path / "r"))
    assert_one_line_error(r, "does not exist")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    r = longctx(
        "train",
        "--data",
        str(tmp_path / "empty"),
        "--steps",
        "1",
        "--out",
        str(tmp_path / "r"),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert_one_line_error(r, "empty")


def test_corrupt_checkpoint(tmp_path, ckpt):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = longctx("info", str(bad))
    assert_one_line_error(r, "truncated")  # info checks the weights' header against the config
    r = longctx("generate", str(bad), "--prompt", "hi", "--max-tokens", "2")
    assert_one_line_error(r, "corrupt")


def test_corrupt_config(tmp_path, ckpt):
    import shutil

    bad = tmp_path / "badcfg"
    shutil.copytree(ckpt, bad)
    (bad / "config.json").write_text("{not json")
    assert_one_line_error(longctx("info", str(bad)), "not valid JSON")


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(longctx("info", str(tmp_path / "none")), "does not exist")


def test_bad_number(tmp_path):
    assert_one_line_error(
        longctx("train", "--steps", "many", "--out", str(tmp_path / "r")), "expects a number"
    )


def test_help_for_every_command(capsys):
    """In-process (one subprocess per command would cost seconds of torch imports each)."""
    from longctx.cli import COMMANDS, main

    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert f"usage: longctx {name}" in capsys.readouterr().out


def test_info_describes_a_checkpoint(ckpt):
    r = longctx("info", str(ckpt))
    assert r.returncode == 0, r.stderr
    assert '"parameters"' in r.stdout and '"rope_theta"' in r.stdout


def test_bad_options_are_one_line_without_the_usage_block():
    cases = {
        ("generate", "x", "--prompt", "hi", "--kv-cache-dtype", "fp8"): "invalid choice: 'fp8'",
        ("generate", "x"): "required: --prompt",
        ("generat",): "invalid choice: 'generat'",
    }
    for argv, needle in cases.items():
        r = longctx(*argv)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert_one_line_error(r, needle)
        assert "--help)" in r.stderr  # where the options are
