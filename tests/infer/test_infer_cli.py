"""`longctx generate` end to end on a tiny checkpoint saved in tmp."""

import pytest
import torch

from longctx import GPT, GPTConfig
from longctx.checkpoint import save_checkpoint
from longctx.cli import main
from longctx.data.tokenizer import ByteTokenizer
from longctx.infer.engine import Engine
from longctx.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", n_layer=2, max_seq_len=64, init_std=0.3))
    return save_checkpoint(tmp_path_factory.mktemp("gen") / "tiny", model), model


def test_generate_prints_what_the_engine_generates(ckpt, capsys):
    path, model = ckpt
    args = [
        "--prompt",
        "Hello",
        "--max-tokens",
        "12",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ]
    assert main(["generate", str(path), *args]) == 0
    printed = capsys.readouterr().out
    want = Engine(model.eval(), ByteTokenizer()).generate(
        "Hello", SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    )
    assert printed == want.text + "\n"


def test_generate_chat_renders_the_template_and_stops_at_the_turn(ckpt, capsys):
    from longctx.infer.chat import ChatTemplate

    path, model = ckpt
    assert main(["generate", str(path), "--chat", "--prompt", "Hi", "--max-tokens", "20"]) == 0
    template = ChatTemplate(None)  # the tiny model has no template of its own: the plain default
    want = Engine(model.eval(), ByteTokenizer()).generate(
        template.render([{"role": "user", "content": "Hi"}]),
        SamplingParams(max_tokens=20, stop=template.default_stop),
    )
    assert capsys.readouterr().out == want.text + "\n"


def test_generate_streaming_int8_runs_past_context(ckpt, capsys):
    path, _ = ckpt
    code = main(
        [
            "generate",
            str(path),
            "--prompt",
            "Hi",
            "--max-tokens",
            "150",
            "--stream-sinks",
            "4",
            "--window",
            "28",
            "--kv-int8",
        ]
    )
    assert code == 0


def test_generate_errors_are_one_line(ckpt, capsys):
    path, _ = ckpt
    assert main(["generate", str(path), "--prompt", "Hi", "--max-tokens", "100"]) == 2
    err = capsys.readouterr().err
    assert "context of 64 tokens" in err and "--stream-sinks" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", str(path), "--prompt", "Hi", "--top-p", "0"]) == 2
    assert main(["generate", str(path.parent / "missing"), "--prompt", "Hi"]) == 2


def test_generate_reports_its_timings_on_stderr(ckpt, capsys):
    path, _ = ckpt
    assert main(["generate", str(path), "--prompt", "Hello there", "--max-tokens", "5"]) == 0
    out = capsys.readouterr()
    line = out.err.strip().splitlines()[-1]
    # the byte tokenizer: one token per byte; stdout keeps the text alone
    assert line.startswith("prompt 11 tokens in ") and "; 5 tokens generated in " in line and "tok/s" in line
    assert "prompt" not in out.out
