"""`longctx eval` on a tiny saved checkpoint, and `longctx report` over two run folders."""

from __future__ import annotations

import json
import math

import pytest
import torch

from longctx import GPT, GPTConfig
from longctx.checkpoint import save_checkpoint
from longctx.cli import main
from longctx.eval import passkey
from longctx.eval.report import save_results, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=260, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=32))
    return str(save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", model))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "corpus.txt"
    f.write_text(" ".join([passkey.FILLER] * 20))
    return str(f)


def test_cli_eval_ppl_writes_results_and_png(ckpt, text_file, tmp_path):
    out = tmp_path / "ppl"
    code = main(
        [
            "eval",
            "ppl",
            ckpt,
            "--data",
            text_file,
            "--split",
            "train",
            "--lengths",
            "16,64",
            "--max-windows",
            "2",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--quiet",
        ]
    )
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "ppl" and res["plots"] == ["ppl.png"]
    (run,) = res["runs"]
    assert run["context_length"] == 32
    assert [r["length"] for r in run["rows"]] == [16, 64]
    assert [r["beyond_trained_length"] for r in run["rows"]] == [False, True]
    assert all(math.isfinite(r["ppl"]) and r["windows"] == 2 for r in run["rows"])
    assert (out / "ppl.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_eval_keeps_finished_checkpoints_of_an_interrupted_run(text_file, tmp_path):
    import shutil

    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=260, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=32)
    a = str(save_checkpoint(tmp_path / "a", GPT(cfg)))
    c = str(save_checkpoint(tmp_path / "c", GPT(cfg)))
    out = tmp_path / "ppl"

    def ppl(*ckpts, lengths="16"):
        args = ["eval", "ppl", *ckpts, "--data", text_file, "--split", "train", "--lengths", lengths]
        return main(args + ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"])

    # the second checkpoint fails to load: the first one's record is on disk already
    assert ppl(a, str(tmp_path / "missing")) == 2
    partial = json.loads((out / "partial.json").read_text())
    assert [r["checkpoint"] for r in partial["runs"]] == [a]
    assert not (out / "results.json").exists()

    # the same command again (one checkpoint fixed) measures only what is missing: `a` is gone from disk
    shutil.rmtree(a)
    assert ppl(a, c) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["checkpoint"] for r in res["runs"]] == [a, c]
    assert res["runs"][0] == partial["runs"][0]
    assert not (out / "partial.json").exists()

    # a record from other settings is never reused: interrupted at length 16, rerun at 32, `c` is measured again
    (out / "results.json").unlink()
    assert ppl(c, str(tmp_path / "missing")) == 2
    assert ppl(c, lengths="32") == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert [r["length"] for r in run["rows"]] == [32]


def test_cli_eval_errors_are_one_line(ckpt, text_file, tmp_path, capsys):
    code = main(
        [
            "eval",
            "ppl",
            ckpt,
            "--data",
            text_file,
            "--split",
            "train",
            "--lengths",
            "16",
            "--stride",
            "32",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longctx eval: error:") and "stride" in err and "\n" not in err


def test_cli_eval_gen(ckpt, tmp_path):
    data = tmp_path / "gen.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"prompt": p, "reference": "the sky is blue"}) for p in ["The grass is", "The sky is"]
        )
    )
    out = tmp_path / "gen"
    assert (
        main(
            [
                "eval",
                "gen",
                ckpt,
                "--data",
                str(data),
                "--metric",
                "bleu,rouge,exact_match",
                "--max-new-tokens",
                "4",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert set(run["metrics"]) == {"bleu", "rouge1", "rouge2", "rougeL", "exact_match"}
    assert len(run["samples"]) == 2


def _fake_run(directory, task, rows, plot_name, **extra):
    from longctx.eval.plots import line_plot

    directory.mkdir(parents=True)
    png = line_plot(
        {"m": ([r["length"] for r in rows], [1.0 for _ in rows])},
        directory / plot_name,
        xlabel="length",
        ylabel="y",
    )
    run = {"name": "m", "checkpoint": "ck", "context_length": 512, "rows": rows, **extra}
    save_results(directory, task, [run], {"lengths": [r["length"] for r in rows]}, [png])


def test_report_renders_two_runs_side_by_side(tmp_path):
    rows_a = [
        {"length": 256, "ppl": 12.5, "beyond_trained_length": False},
        {"length": 1024, "ppl": 40.25, "beyond_trained_length": True},
    ]
    rows_b = [
        {"length": 256, "ppl": 11.0, "beyond_trained_length": False},
        {"length": 1024, "ppl": 13.0, "beyond_trained_length": False},
    ]
    _fake_run(tmp_path / "baseline", "ppl", rows_a, "ppl.png")
    _fake_run(tmp_path / "yarn", "ppl", rows_b, "ppl.png")
    ruler_rows = [{"length": 256, "scores": {"vt": 90.0}, "mean": 90.0, "beyond_trained_length": False}]
    _fake_run(
        tmp_path / "yarn_ruler",
        "ruler",
        ruler_rows,
        "ruler.png",
        tasks=["vt"],
        threshold=85.6,
        effective_length=256,
        wavg_inc=90.0,
        wavg_dec=90.0,
    )
    md, page = write_report(
        [tmp_path / "baseline", tmp_path / "yarn", tmp_path / "yarn_ruler"],
        tmp_path / "out" / "report.md",
        title="T",
        intro="Two runs.",
    )
    text = md.read_text()
    assert text.startswith("# T") and "Two runs." in text
    assert "| length | baseline | yarn |" in text
    assert "| 1024 | 40.250\u2020 | 13.000 |" in text  # beyond the trained length: marked
    assert "](../baseline/ppl.png)" in text and "](../yarn/ppl.png)" in text
    assert "| yarn_ruler | 256 | 90.0 | 90.0 |" in text
    html = page.read_text()
    assert html.count("<table>") >= 3 and 'src="../yarn/ppl.png"' in html
    # the CLI front end
    assert (
        main(["report", str(tmp_path / "baseline"), str(tmp_path / "yarn"), "--out", str(tmp_path / "r2.md")])
        == 0
    )
    assert (tmp_path / "r2.html").exists()


def test_report_rejects_a_folder_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 2
    assert "holds no results.json" in capsys.readouterr().err


def test_report_on_a_folder_of_runs_skips_other_results(tmp_path):
    rows = [{"length": 128, "accuracy": 0.5, "beyond_trained_length": False}]
    _fake_run(tmp_path / "all" / "passkey", "passkey", rows, "passkey.png")
    (tmp_path / "all" / "sweep").mkdir()
    (tmp_path / "all" / "sweep" / "results.json").write_text(json.dumps({"task": "qa", "results": []}))
    md, _ = write_report([tmp_path / "all"], tmp_path / "all" / "report.md")
    text = md.read_text()
    assert "| 128 | 0.50 |" in text and "](passkey/passkey.png)" in text
    assert "left out" in text and "sweep" in text
