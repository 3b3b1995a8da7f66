"""`longctx demo`: the whole story, short context to long, on the embedded corpus (Python's own sources).

1. train the `small` preset (RoPE) with a context-length curriculum up to L0 = 256, with a share of
   synthetic passkey samples so the model learns to retrieve at all;
2. extend it to 8·L0 = 2048 with `none`, `linear` and `yarn`, each with the same short fine-tune;
3. evaluate every model: perplexity vs length, passkey accuracy, a needle-in-a-haystack heatmap for the
   best method;
4. write `runs/demo/report.md` (and `.html`).

Every stage is an ordinary `longctx` command (the report lists them, to rerun any stage alone); a stage
whose outputs are complete is skipped, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from longctx.errors import LongctxError

DONE = ".demo_stage.json"


@dataclass(frozen=True)
class Plan:
    """The demo's knobs. `full` fits in ~15 minutes on 2 CPU cores; `quick` in a few minutes."""

    preset: str
    L0: int
    factor: int
    train_steps: int
    batch_size: int
    lr: float
    extend_steps: int
    extend_batch: int
    methods: tuple[str, ...]
    ppl_lengths: tuple[int, ...]
    ppl_windows: int
    passkey_lengths: tuple[int, ...]
    passkey_depths: str
    passkey_trials: int
    niah_lengths: tuple[int, ...]
    niah_depths: str
    retrieval_mix: float = 0.25
    overrides: tuple[str, ...] = field(default_factory=tuple)

    @property
    def schedule(self) -> str:
        # half the steps at L0/2, then L0: the same tokens per step throughout
        return f"{self.L0 // 2}:0,{self.L0}:{self.train_steps // 2}"


PLANS = {
    "full": Plan(
        preset="small",
        L0=256,
        factor=8,
        train_steps=240,
        batch_size=8,
        lr=2e-3,
        extend_steps=30,
        extend_batch=1,
        methods=("none", "linear", "yarn"),
        ppl_lengths=(256, 512, 1024, 2048, 4096),
        ppl_windows=4,
        passkey_lengths=(256, 1024, 2048),
        passkey_depths="0,50,100",
        passkey_trials=2,
        niah_lengths=(512, 1024, 2048),
        niah_depths="0,25,50,75,100",
    ),
    "quick": Plan(
        preset="tiny",
        L0=128,
        factor=4,
        train_steps=40,
        batch_size=8,
        lr=3e-3,
        extend_steps=4,
        extend_batch=1,
        methods=("none", "linear", "yarn"),
        ppl_lengths=(128, 256, 512),
        ppl_windows=2,
        passkey_lengths=(512,),
        passkey_depths="0,100",
        passkey_trials=1,
        niah_lengths=(512,),
        niah_depths="0,100",
        overrides=("n_layer=2",),
    ),
}


@dataclass
class Stage:
    name: str
    argv: list[str]
    out: Path
    weight: float  # rough relative cost, for the ETA before anything has been timed


def stages(plan: Plan, root: Path, device: str) -> list[Stage]:
    base = root / "base"
    L = plan.L0 * plan.factor
    ckpts = {"base": base, **{m: root / f"extend-{m}" for m in plan.methods}}
    dev = ["--device", device]
    lens = ",".join(map(str, plan.ppl_lengths))
    out = [
        Stage(
            "train",
            [
                "train",
                "--preset",
                plan.preset,
                "--seq-len",
                str(plan.L0),
                "--seq-len-schedule",
                plan.schedule,
                "--steps",
                str(plan.train_steps),
                "--batch-size",
                str(plan.batch_size),
                "--lr",
                str(plan.lr),
                "--retrieval-mix",
                str(plan.retrieval_mix),
                "--eval-every",
                str(max(1, plan.train_steps // 4)),
                "--log-every",
                "25",
                "--out",
                str(base),
                *dev,
                *[a for o in plan.overrides for a in ("--set", o)],
            ],
            base,
            10.0,
        )
    ]
    for m in plan.methods:
        out.append(
            Stage(
                f"extend {m}",
                [
                    "extend",
                    str(base),
                    "--method",
                    m,
                    "--factor",
                    str(plan.factor),
                    "--seq-len",
                    str(L),
                    "--steps",
                    str(plan.extend_steps),
                    "--batch-size",
                    str(plan.extend_batch),
                    "--out",
                    str(ckpts[m]),
                    *dev,
                ],
                ckpts[m],
                1.5,
            )
        )
    all_ckpts = [str(p) for p in ckpts.values()]
    names = ",".join(ckpts)
    ev = root / "eval"
    out.append(
        Stage(
            "eval ppl",
            [
                "eval",
                "ppl",
                *all_ckpts,
                "--names",
                names,
                "--lengths",
                lens,
                "--max-windows",
                str(plan.ppl_windows),
                "--out",
                str(ev / "ppl"),
                *dev,
            ],
            ev / "ppl",
            2.0,
        )
    )
    out.append(
        Stage(
            "eval passkey",
            [
                "eval",
                "passkey",
                *all_ckpts,
                "--names",
                names,
                "--lengths",
                ",".join(map(str, plan.passkey_lengths)),
                "--depths",
                plan.passkey_depths,
                "--trials",
                str(plan.passkey_trials),
                "--out",
                str(ev / "passkey"),
                *dev,
            ],
            ev / "passkey",
            1.5,
        )
    )
    # the needle heatmap is drawn for the best extended method: chosen when the stage runs (see `_niah`)
    out.append(
        Stage(
            "eval niah",
            [
                "eval",
                "niah",
                "BEST",
                "--lengths",
                ",".join(map(str, plan.niah_lengths)),
                "--depths",
                plan.niah_depths,
                "--out",
                str(ev / "niah"),
                *dev,
            ],
            ev / "niah",
            1.0,
        )
    )
    return out


def _results(path: Path) -> dict | None:
    f = path / "results.json"
    return json.loads(f.read_text()) if f.exists() else None


def _rows(results: dict | None, name: str) -> dict[int, dict]:
    for run in (results or {}).get("runs", []):
        if run.get("name") == name:
            return {int(r["length"]): r for r in run.get("rows", [])}
    return {}


def best_method(root: Path, plan: Plan) -> str:
    """The extended model with the lowest perplexity at the extended length (ties: first listed)."""
    ppl = _results(root / "eval" / "ppl")
    L = plan.L0 * plan.factor
    scored = []
    for m in plan.methods:
        row = _rows(ppl, m).get(L)
        if row and row.get("ppl") is not None:
            scored.append((float(row["ppl"]), m))
    return min(scored)[1] if scored else plan.methods[-1]


def _run_stage(stage: Stage, root: Path, plan: Plan) -> float:
    from longctx.cli import main as cli_main

    argv = list(stage.argv)
    if "BEST" in argv:
        best = best_method(root, plan)
        argv[argv.index("BEST")] = str(root / f"extend-{best}")
        argv += ["--names", best]
        stage.argv = argv
    if stage.name == "train" and (stage.out / "trainer_state.json").exists():
        argv.append("--resume")  # an interrupted training run continues from its last checkpoint
    t0 = time.perf_counter()
    code = cli_main(argv)
    if code != 0:
        raise LongctxError(
            f"demo stage '{stage.name}' failed (exit {code}); rerun `longctx "
            f"{shlex.join(argv)}` to see why, then `longctx demo` again to continue"
        )
    seconds = time.perf_counter() - t0
    (stage.out / DONE).write_text(json.dumps({"argv": argv, "seconds": round(seconds, 1)}) + "\n")
    return seconds


def run_demo(
    quick: bool = False, out: str | Path = "runs/demo", device: str = "auto", restart: bool = False
) -> Path:
    plan = PLANS["quick" if quick else "full"]
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if restart:
        for f in root.rglob(DONE):
            f.unlink()
    todo = stages(plan, root, device)
    times: dict[str, float] = {}
    commands: dict[str, list[str]] = {}
    t_start = time.perf_counter()
    spent_weight, spent_time = 0.0, 0.0
    total_weight = sum(s.weight for s in todo)
    for i, stage in enumerate(todo, 1):
        marker = stage.out / DONE
        if marker.exists():
            done = json.loads(marker.read_text())
            times[stage.name], commands[stage.name] = done["seconds"], done["argv"]
            print(f"[{i}/{len(todo)}] {stage.name}: already complete ({done['seconds']:.0f}s), skipped")
            continue
        left = total_weight - sum(s.weight for s in todo[: i - 1])
        eta = f", about {left * spent_time / spent_weight / 60:.1f} min left in all" if spent_weight else ""
        print(f"\n[{i}/{len(todo)}] {stage.name}{eta}\n  longctx {shlex.join(stage.argv)}", flush=True)
        seconds = _run_stage(stage, root, plan)
        times[stage.name], commands[stage.name] = seconds, stage.argv
        spent_weight += stage.weight
        spent_time += seconds
    report = write_demo_report(root, plan, times, commands, time.perf_counter() - t_start)
    print(f"\nreport: {report}  (and {report.with_suffix('.html')})")
    return report


# -- the report ---------------------------------------------------------------------------------------
def _machine() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, Python {platform.python_version()}"
    )


def _table(
    results: dict | None, names: list[str], lengths: list[int], key: str, fmt: str, trained: int
) -> list[str]:
    head = "| model | " + " | ".join(f"{L}{'' if L <= trained else ''}" for L in lengths) + " |"
    lines = [head, "|---|" + "---:|" * len(lengths)]
    for n in names:
        rows = _rows(results, n)
        cells = []
        for L in lengths:
            r = rows.get(L)
            v = None if r is None else r.get(key)
            cells.append(
                "–" if v is None else fmt.format(v) + ("†" if r.get("beyond_trained_length") else "")
            )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def verdicts(root: Path, plan: Plan) -> list[str]:
    """Plain sentences on what each method did, from the measured numbers (no wishful thinking)."""
    ppl = _results(root / "eval" / "ppl")
    pk = _results(root / "eval" / "passkey")
    L0, L = plan.L0, plan.L0 * plan.factor
    out = []
    base = _rows(ppl, "base")
    base_L0 = base.get(L0, {}).get("ppl")
    base_L = base.get(L, {}).get("ppl")
    if base_L0 and base_L:
        longest = max(base)
        worst = max(r["ppl"] for r in base.values() if r.get("ppl") is not None)
        s = f"The base model scores perplexity {base_L0:.2f} at its trained length {L0} and {base_L:.2f} at {L}"
        if longest > L and base[longest].get("ppl") is not None:
            s += f", {base[longest]['ppl']:.2f} at {longest}"
        s += ": " + (
            "it does not extrapolate."
            if worst > 1.5 * base_L0
            else "it extrapolates without blowing up (byte-level code is locally predictable)."
        )
        out.append(s)
    for m in plan.methods:
        at_L = _rows(ppl, m).get(L, {}).get("ppl")
        at_L0 = _rows(ppl, m).get(L0, {}).get("ppl")
        if at_L is None:
            continue
        s = f"`{m}` after {plan.extend_steps} fine-tune steps: perplexity {at_L:.2f} at {L}"
        if at_L0 is not None:
            s += f" ({'no worse than' if at_L <= at_L0 * 1.02 else 'worse than'} its {at_L0:.2f} at {L0})"
        if base_L:
            s += (
                "; it helped against the base model"
                if at_L < base_L
                else "; it did NOT help against the base"
            )
        acc = [r.get("accuracy") for r in _rows(pk, m).values() if r.get("accuracy") is not None]
        if acc:
            s += f"; mean passkey accuracy {sum(acc) / len(acc):.2f}"
        out.append(s + ".")
    accs = [r.get("accuracy") for n in ("base", *plan.methods) for r in _rows(pk, n).values()]
    if accs and not any(accs):
        out.append(
            "No model retrieved a single passkey: this training budget is too small for the model to learn "
            "retrieval (the synthetic samples in training were not enough), so the passkey numbers say "
            "nothing about the methods here; a longer `longctx train` run is the fix."
        )
    return out


def write_demo_report(
    root: Path, plan: Plan, times: dict[str, float], commands: dict[str, list[str]], total: float
) -> Path:
    names = ["base", *plan.methods]
    ppl, pk, niah = (_results(root / "eval" / t) for t in ("ppl", "passkey", "niah"))
    L = plan.L0 * plan.factor
    md = [
        f"# longctx demo: from {plan.L0} to {L} tokens",
        "",
        f"A `{plan.preset}` GPT (RoPE, byte-level tokens) was trained on Python's standard-library sources "
        f"with a context-length curriculum up to L0 = {plan.L0}, then extended {plan.factor}x to {L} "
        f"with {', '.join(f'`{m}`' for m in plan.methods)}, each fine-tuned for {plan.extend_steps} steps at "
        f"{L}. `none` keeps the original RoPE and only fine-tunes; `linear` is position interpolation; "
        "`yarn` is NTK-by-parts interpolation with attention temperature (see docs).",
        "",
        f"Machine: {_machine()}. Time: {sum(times.values()) / 60:.1f} min over the stages below "
        f"({total / 60:.1f} min in this invocation; an interrupted demo resumes and skips finished stages).",
        "",
        "## What happened",
        "",
    ]
    md += [f"- {v}" for v in verdicts(root, plan)] + [""]
    md += [
        "## Perplexity vs context length (validation files; lower is better)",
        "",
        *_table(ppl, names, list(plan.ppl_lengths), "ppl", "{:.2f}", L),
        "",
        "† beyond the length the model's position configuration addresses.",
        "",
    ]
    md += [
        "## Passkey retrieval accuracy",
        "",
        *_table(pk, names, list(plan.passkey_lengths), "accuracy", "{:.2f}", L),
        "",
    ]
    for res, sub in ((ppl, "ppl"), (pk, "passkey"), (niah, "niah")):
        for p in (res or {}).get("plots", []):
            md += [f"![{sub}](eval/{sub}/{p})", ""]
    md += ["## Stages", "", "| stage | seconds | command to rerun it alone |", "|---|---:|---|"]
    for name, secs in times.items():
        md.append(f"| {name} | {secs:.0f} | `longctx {shlex.join(commands[name])}` |")
    md.append("")
    path = root / "report.md"
    path.write_text("\n".join(md))
    path.with_suffix(".html").write_text(_html("\n".join(md), f"longctx demo: {plan.L0} to {L}"))
    return path


def _html(markdown: str, title: str) -> str:
    """A small Markdown subset (headings, tables, images, lists, paragraphs) to HTML, no dependency."""
    import html
    import re

    def inline(s: str) -> str:
        s = html.escape(s)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)

    out, rows = [], []

    def flush_table() -> None:
        if rows:
            out.append("<table>" + "".join(rows) + "</table>")
            rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-:") for c in cells):
                continue
            tag = "th" if not rows else "td"
            rows.append("<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        flush_table()
        if m := re.match(r"!\[(.*)\]\((.*)\)", line):
            out.append(
                f'<p><img src="{html.escape(m.group(2))}" alt="{html.escape(m.group(1))}" '
                'style="max-width:100%"></p>'
            )
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush_table()
    style = (
        "body{font-family:sans-serif;max-width:980px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(out)}</body></html>"
    )


# -- CLI ----------------------------------------------------------------------------------------------
def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick", action="store_true", help="smaller everything: a few minutes (used by the tests)"
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: cuda when available)")
    p.add_argument("--restart", action="store_true", help="rerun every stage, even complete ones")


def run(args: argparse.Namespace) -> int:
    run_demo(quick=args.quick, out=args.out, device=args.device, restart=args.restart)
    return 0
