"""The demo's real-model track: the plan it picks from the measured speed, the 95% intervals, the effective
length, and the whole track end to end on a tiny stand-in model (the pulled SmolLM2: the slow test)."""

import json
import math
from dataclasses import asdict

import pytest
import torch

from longctx import GPT, GPTConfig
from longctx.demo import real
from longctx.demo.report import wilson
from longctx.demo.stages import run_stages


def test_wilson_interval_known_values():
    # Wilson score intervals (z = 1.96) as tabulated by Newcombe (1998), Table I
    for (k, n), (lo, hi) in {
        (0, 10): (0.0, 0.2775),
        (5, 10): (0.2366, 0.7634),
        (81, 263): (0.2553, 0.3662),
    }.items():
        got = wilson(k, n)
        assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4)


def test_the_plan_follows_the_budget():
    # AMD EPYC fp32 (measured): 4K in ~12 s, 16K in ~135 s; an AMX Xeon in bf16 is ~4x faster
    slow = real.Speed(a=1.15e-3, b=4.3e-7, probes=[(1024, 1.6), (4096, 12.0)], dtype="float32")
    fast = real.Speed(a=2.9e-4, b=1.1e-7, probes=[(1024, 0.4), (4096, 3.0)], dtype="bfloat16")
    costs = [real.estimate(p, slow, 8192) for p in real.PLANS[1:]]
    assert costs == sorted(costs, reverse=True)  # richest first
    plan, why = real.choose(slow, 5 * 60, 8192, "cpu", full=False)
    assert plan.name == "minimal" and "runs anyway" in why and "16K would take" in why
    assert "runs anyway" not in real.choose(slow, 13 * 60, 8192, "cpu", full=False)[1]
    assert (
        real.choose(slow, 26 * 60, 8192, "cpu", full=False)[0].name == "tight"
    )  # passkey past 8K, one depth
    assert real.choose(fast, 12 * 60, 8192, "cpu", full=False)[0].name == "small"
    assert real.choose(fast, 1e9, 8192, "cpu", full=False)[0].name == "full"  # no GPU plan without a GPU
    assert real.choose(slow, 60, 8192, "cpu", full=True)[0].name == "full"
    assert real.choose(fast, 1e9, 8192, "cuda", full=False)[0].finetune_steps > 0


def test_effective_length_is_rulers_rule():
    def run(name, accs):
        return {"name": name, "rows": [{"length": L, "accuracy": a} for L, a in accs.items()]}

    pk = {
        "runs": [
            run("none", {2048: 1.0, 8192: 0.8, 16384: 0.0}),
            run("yarn", {2048: 0.9, 8192: 0.9, 16384: 0.86}),
        ]
    }
    assert real.effective_lengths(pk, ["none", "yarn"], 8192) == {"none": 2048, "yarn": 16384}


def _tiny_model(tmp_path):
    from longctx.checkpoint import save_checkpoint
    from longctx.data.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", n_layer=2, max_seq_len=2048, vocab_size=260))
    return str(save_checkpoint(tmp_path / "model", model, ByteTokenizer()))


def test_probe_fit_leaves_out_the_first_prefills_one_off_cost(tmp_path, monkeypatch):
    """A prefill that costs a*L + b*L^2, plus 0.3 s once (a process's first): the fit recovers a and b."""
    import time

    import longctx.infer.generate as generate

    a, b, first = 2e-5, 2e-9, [True]

    def timed_prefill(model, cache, ids, chunk=512, on_chunk=None):
        n = ids.shape[1]
        time.sleep(a * n + b * n * n + (0.3 if first[0] else 0.0))
        first[0] = False

    monkeypatch.setattr(generate, "prefill", timed_prefill)
    speed = real.probe(_tiny_model(tmp_path), "cpu")
    assert speed.b == pytest.approx(b, rel=0.15) and speed.a == pytest.approx(a, rel=0.15)


@pytest.mark.parametrize("plan_name", ["minimal", "tight"])
def test_real_track_end_to_end_on_a_tiny_model(tmp_path, plan_name):
    ckpt, root = _tiny_model(tmp_path), tmp_path / "real"
    run_stages([real.probe_stage(root, ckpt, "cpu", budget_s=30, full=False)], "real")
    plan, record = real.load_plan(root)
    assert record["trained"] == 2048 and record["speed"]["a"] > 0 and plan.name == "minimal"
    if plan_name != plan.name:  # the richer plan, as a faster machine would choose it
        record["plan"] = asdict(next(p for p in real.PLANS if p.name == plan_name))
        real.plan_path(root).write_text(json.dumps(record))
        plan, record = real.load_plan(root)
    run_stages(real.stages(root, "cpu"), "real")
    md = "\n".join(real.section(root))
    for heading in ("### Perplexity", "### Passkey accuracy", "### Reference: transformers"):
        assert heading in md
    ppl = json.loads((root / "eval" / "ppl" / "results.json").read_text())
    assert {r["name"] for r in ppl["runs"]} == set(plan.methods)
    assert all(math.isfinite(row["ppl"]) for r in ppl["runs"] for row in r["rows"])
    ref = json.loads((root / "reference" / "results.json").read_text())
    assert set(ref["methods"]) == {"none", "yarn"} and ref["depth"] == plan.reference_depth
    assert all(len(rs) == plan.reference_trials for rs in ref["methods"].values())
    # an untrained model answers nothing right; transformers' implementation must agree with ours
    assert all(r["same_answer"] for rs in ref["methods"].values() for r in rs)
    n = len(plan.depths) * plan.trials
    assert f"n={n}" in md


@pytest.mark.slow
def test_real_track_on_the_pulled_model(tmp_path):
    from longctx.catalogue import models_dir

    if not (models_dir() / real.MODEL / "config.json").exists():
        pytest.skip(f"{real.MODEL} is not in the cache: run `longctx pull {real.MODEL}`")
    root = tmp_path / "real"
    run_stages([real.probe_stage(root, real.MODEL, "cpu", budget_s=60, full=False)], "real")
    run_stages(real.stages(root, "cpu"), "real")
    pk = json.loads((root / "eval" / "passkey" / "results.json").read_text())
    accs = [row["accuracy"] for r in pk["runs"] for row in r["rows"]]
    assert accs and all(0.0 <= a <= 1.0 for a in accs)
    assert max(accs) > 0.0  # a pretrained model retrieves at a quarter of its trained length
    ppl = json.loads((root / "eval" / "ppl" / "results.json").read_text())
    assert all(math.isfinite(row["ppl"]) for r in ppl["runs"] for row in r["rows"])
    assert "### Passkey accuracy" in "\n".join(real.section(root))
