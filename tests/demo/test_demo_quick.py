"""`longctx demo --quick`: the whole story end to end, small; the report and its numbers exist and are finite."""

import json
import math

from longctx.demo import PLANS, run_demo


def test_quick_demo_writes_a_report_with_finite_numbers(tmp_path, capsys):
    report = run_demo(quick=True, out=tmp_path / "demo", device="cpu")
    plan = PLANS["quick"]
    md = report.read_text()
    assert report.with_suffix(".html").exists()
    for section in ("### Perplexity vs context length", "### Passkey retrieval accuracy", "## Stages"):
        assert section in md
    ppl = json.loads((tmp_path / "demo" / "scratch" / "eval" / "ppl" / "results.json").read_text())
    names = {run["name"] for run in ppl["runs"]}
    assert names == {"base", *plan.methods}
    for run in ppl["runs"]:
        values = {r["length"]: r["ppl"] for r in run["rows"]}
        assert set(values) == set(plan.ppl_lengths)
        assert all(math.isfinite(v) and v > 1.0 for v in values.values())
    pk = json.loads((tmp_path / "demo" / "scratch" / "eval" / "passkey" / "results.json").read_text())
    for run in pk["runs"]:
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in run["rows"])
    for res in (ppl, pk):
        for plot in res["plots"]:
            assert (tmp_path / "demo" / "scratch" / "eval" / res["task"] / plot).stat().st_size > 1000
            assert f"scratch/eval/{res['task']}/{plot}" in md  # the report's image links resolve
    # every number in the perplexity table is printed (no '–' holes) and the extension actually happened
    table = md.split("### Perplexity vs context length")[1].split("##")[0]
    assert "–" not in table and "nan" not in table.lower()
    cfg = json.loads((tmp_path / "demo" / "scratch" / "extend-yarn" / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "yarn" and cfg["max_seq_len"] == plan.L0 * plan.factor


def test_an_interrupted_demo_skips_finished_stages(tmp_path, capsys):
    """Rerun after completion: every stage is skipped and the report is rewritten from the stored results."""
    out = tmp_path / "demo"
    run_demo(quick=True, out=out, device="cpu")
    (out / "report.md").unlink()
    capsys.readouterr()
    run_demo(quick=True, out=out, device="cpu")
    printed = capsys.readouterr().out
    assert printed.count("already complete") == 7
    assert (out / "report.md").exists()
