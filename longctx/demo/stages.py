"""The demo's stages: each an ordinary `longctx` command (or, for the few things no command does, a function),
run in order, timed, and marked complete so that an interrupted demo skips what it already finished."""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from longctx.errors import LongctxError

DONE = ".demo_stage.json"


@dataclass
class Stage:
    name: str
    out: Path  # the stage's folder: the DONE marker there says it is complete
    argv: list[str] | None = None  # a longctx command line
    fn: Callable[[], None] | None = None  # or a function, for what no command does
    weight: float = 1.0  # rough relative cost, for the ETA before anything has been timed
    prepare: Callable[[list[str]], list[str]] | None = None  # fills in the argv when the stage starts

    @property
    def command(self) -> str:
        return f"longctx {shlex.join(self.argv)}" if self.argv else "(inside longctx demo)"


@dataclass
class Ran:
    seconds: float
    command: str


def results(path: Path) -> dict | None:
    """A stage's results.json (None when it has not run)."""
    f = path / "results.json"
    return json.loads(f.read_text()) if f.exists() else None


def rows(res: dict | None, name: str) -> dict[int, dict]:
    """{length: row} of the run called `name` in an evaluation's results."""
    for run in (res or {}).get("runs", []):
        if run.get("name") == name:
            return {int(r["length"]): r for r in run.get("rows", [])}
    return {}


def run_stages(todo: list[Stage], label: str) -> dict[str, Ran]:
    """Run every stage not yet complete; -> what each took (from its marker when it was complete)."""
    from longctx.cli import main as cli_main

    done: dict[str, Ran] = {}
    spent_weight = spent_time = 0.0
    total_weight = sum(s.weight for s in todo)
    for i, stage in enumerate(todo, 1):
        marker = stage.out / DONE
        if marker.exists():
            m = json.loads(marker.read_text())
            done[f"{label}: {stage.name}"] = Ran(m["seconds"], m["command"])
            print(f"[{label} {i}/{len(todo)}] {stage.name}: already complete ({m['seconds']:.0f}s), skipped")
            continue
        if stage.prepare is not None:
            stage.argv = stage.prepare(list(stage.argv or []))
        left = total_weight - sum(s.weight for s in todo[: i - 1])
        eta = f", about {left * spent_time / spent_weight / 60:.1f} min left" if spent_weight else ""
        print(f"\n[{label} {i}/{len(todo)}] {stage.name}{eta}\n  {stage.command}", flush=True)
        t0 = time.perf_counter()
        if stage.fn is not None:
            stage.fn()
        else:
            code = cli_main(stage.argv)
            if code != 0:
                raise LongctxError(
                    f"demo stage '{stage.name}' failed (exit {code}); rerun `{stage.command}` to see why, "
                    "then `longctx demo` again to continue"
                )
        seconds = time.perf_counter() - t0
        stage.out.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"command": stage.command, "seconds": round(seconds, 1)}) + "\n")
        done[f"{label}: {stage.name}"] = Ran(seconds, stage.command)
        spent_weight += stage.weight
        spent_time += seconds
    return done


def stage_table(done: dict[str, Ran]) -> list[str]:
    lines = ["| stage | seconds | command to rerun it alone |", "|---|---:|---|"]
    lines += [f"| {name} | {r.seconds:.0f} | `{r.command}` |" for name, r in done.items()]
    return lines
