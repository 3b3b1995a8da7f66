"""`--precision auto` (the training default) and `--dtype auto` (inference): bf16 only where the hardware runs
it natively, confirmed by a timed check; the first progress line says which and why; bf16 training tracks
fp32's loss curve."""

import pytest
import torch

import longctx.device as device
import longctx.infer.engine as engine_module
from longctx.errors import ConfigError
from longctx.infer.engine import EngineSpec
from longctx.train.pretrain import TrainArgs, train

CPU = torch.device("cpu")


def test_no_flags_no_bf16(monkeypatch):
    monkeypatch.delenv("LONGCTX_AUTO_PRECISION", raising=False)
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(device, "_bf16_speedup", lambda: pytest.fail("no timed check without the flags"))
    precision, why = device.resolve_precision("auto", CPU)
    assert precision == "fp32" and "no native bf16" in why


@pytest.mark.parametrize(("speedup", "want"), [(5.6, "bf16"), (1.0, "fp32")])
def test_flags_are_confirmed_by_the_timed_check(monkeypatch, speedup, want):
    monkeypatch.delenv("LONGCTX_AUTO_PRECISION", raising=False)
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "amx_bf16", "avx512_bf16"})
    monkeypatch.setattr(device, "_bf16_speedup", lambda: speedup)
    precision, why = device.resolve_precision("auto", CPU)
    assert precision == want and f"{speedup:.1f}x fp32 measured" in why
    spec, note = EngineSpec(dtype="auto").resolved(CPU)
    assert spec.dtype == want and note == why.removeprefix("auto: ")
    # quantized weights: auto is the prefill's arithmetic, decided the same way
    quantized = EngineSpec(dtype="auto", quantize="int8").resolved(CPU)[0]
    assert quantized.dtype == want
    monkeypatch.setattr(engine_module, "cpu_emulates", lambda dtype: want != "bf16")
    assert quantized.prefill_dtype() == (torch.bfloat16 if want == "bf16" else torch.float32)


def test_the_timed_check_runs_once_and_is_cached(monkeypatch, tmp_path):
    import longctx.data.cache as cache

    monkeypatch.setattr(cache, "DEFAULT_CACHE", tmp_path)
    first = device._bf16_speedup()  # a real measurement on this machine
    assert first > 0 and (tmp_path / "bf16_check.json").exists()
    monkeypatch.setattr(torch, "randn", lambda *a, **k: pytest.fail("measured again"))
    assert device._bf16_speedup() == first


def test_pinning_and_explicit_choices(monkeypatch):
    monkeypatch.setenv("LONGCTX_AUTO_PRECISION", "bf16")
    assert device.resolve_precision("auto", CPU) == ("bf16", "auto: pinned by LONGCTX_AUTO_PRECISION=bf16")
    assert device.resolve_precision("fp32", CPU) == ("fp32", "")
    monkeypatch.setenv("LONGCTX_AUTO_PRECISION", "fp8")
    with pytest.raises(ConfigError, match="fp32 or bf16"):
        device.resolve_precision("auto", CPU)


def _args(tmp_path, corpus, cache, **kw) -> TrainArgs:
    base = dict(preset="tiny", data=corpus, cache_dir=cache, seq_len=64, batch_size=4, steps=2, lr=3e-3,
                warmup=2, out=str(tmp_path / "run"), eval_batches=1, seed=0,
                config_overrides={"n_layer": 2, "d_model": 64, "n_head": 2, "d_ff": 128})  # fmt: skip
    base.update(kw)
    return TrainArgs.from_flat(**base)


def test_the_first_progress_line_says_which_and_why(tmp_path, small_corpus, cache_dir, capsys):
    assert _args(tmp_path, small_corpus, cache_dir).loop.precision == "auto"  # the default
    train(_args(tmp_path, small_corpus, cache_dir))
    out = capsys.readouterr().out
    assert "precision=fp32 (auto: pinned by LONGCTX_AUTO_PRECISION=fp32)" in out


@pytest.mark.slow
def test_bf16_loss_curve_tracks_fp32_over_200_steps(tmp_path, small_corpus, cache_dir):
    """Autocast bf16 (fp32 master weights, optimizer state and loss) against fp32, same seed and batches:
    the mean loss over each 20-step window stays within 3% of fp32's."""
    curves = {}
    for p in ("fp32", "bf16"):
        r = train(_args(tmp_path / p, small_corpus, cache_dir, steps=200, precision=p, quiet=True))
        curves[p] = [h["loss"] for h in r.history if "loss" in h]
    assert len(curves["fp32"]) == len(curves["bf16"]) == 200
    for s in range(0, 200, 20):
        a, b = (sum(c[s : s + 20]) / 20 for c in (curves["fp32"], curves["bf16"]))
        assert abs(b - a) <= 0.03 * a, (s, a, b)
    assert curves["bf16"][-1] < 0.6 * curves["bf16"][0]
