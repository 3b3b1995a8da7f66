"""`longctx report RUN_DIR...`: one Markdown page (and the same as HTML) gathering the `results.json` and
plots of several evaluation runs, side by side.

Every `longctx eval` command writes `<out>/results.json` with this layout (owned here, so the writer and
the reader cannot drift apart):

    {"task": "ppl" | "passkey" | "niah" | "ruler" | "gen", "longctx_version": ..., "created": ...,
     "settings": {...the command's options...},
     "runs": [{"name": ..., "checkpoint": ..., "context_length": N, "rows": [{"length": L,
               "beyond_trained_length": bool, ...metrics}], ...}],   # one run per checkpoint
     "plots": ["ppl.png", ...]}                                      # relative to results.json

A RUN_DIR is a folder holding results.json, or a folder whose sub-folders do (e.g. a demo's output).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from longctx.errors import DataError

RESULTS = "results.json"
# the headline metric per task, its display name and format
HEADLINE = {
    "ppl": ("ppl", "perplexity", "{:.3f}"),
    "passkey": ("accuracy", "passkey accuracy", "{:.2f}"),
    "niah": ("score", "needle score", "{:.2f}"),
    "ruler": ("mean", "RULER mean score", "{:.1f}"),
}
TASK_TITLES = {
    "ppl": "Perplexity vs context length",
    "passkey": "Passkey retrieval",
    "niah": "Needle in a haystack",
    "ruler": "RULER",
    "gen": "Generation metrics",
}
BEYOND = "\u2020"


def save_results(
    out_dir: str | Path, task: str, runs: list[dict], settings: dict, plots: Sequence[str | Path] = ()
) -> Path:
    """Write `<out_dir>/results.json` (plots are stored relative to out_dir)."""
    from longctx import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "task": task,
        "longctx_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "runs": runs,
        "plots": [os.path.relpath(Path(p), out) for p in plots],
    }
    return write_json_atomic(out / RESULTS, payload)


def write_json_atomic(path: Path, payload: dict) -> Path:
    """Write JSON through a temporary file and a rename, so a killed process never leaves half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


@dataclass
class LoadedResult:
    directory: Path
    data: dict


def _is_eval_results(data: object) -> bool:
    return isinstance(data, dict) and "task" in data and isinstance(data.get("runs"), list)


def find_results(run_dir: str | Path) -> tuple[list[LoadedResult], list[Path]]:
    """The eval results in `run_dir` (or its sub-folders), and the results.json files skipped there because
    they are some other command's (e.g. a fine-tuning sweep's)."""
    d = Path(run_dir)
    if not d.is_dir():
        raise DataError(f"run directory {d} does not exist")
    direct = (d / RESULTS).exists()
    files = [d / RESULTS] if direct else sorted(d.glob(f"*/{RESULTS}"))
    if not files:
        raise DataError(
            f"{d} holds no {RESULTS} (nor do its sub-folders); pass the --out folder of a `longctx eval` run"
        )
    found, skipped = [], []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{f} is not valid JSON ({e})") from None
        if _is_eval_results(data):
            found.append(LoadedResult(f.parent, data))
        elif direct:
            raise DataError(f"{f} is not a `longctx eval` results file (no 'task'/'runs')")
        else:
            skipped.append(f)
    return found, skipped


# -- a tiny document model, rendered to Markdown and to HTML ------------------------------------------
Block = tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("images", [(caption, path)])


def _fmt(v, fmt: str) -> str:
    return "–" if v is None else fmt.format(v)


def _label(res: LoadedResult, run: dict, n_runs: int) -> str:
    return res.directory.name if n_runs == 1 else f"{res.directory.name}/{run.get('name', '?')}"


def _length_table(results: list[LoadedResult], key: str, fmt: str) -> Block:
    columns, cells, lengths = [], [], set()
    for res in results:
        for run in res.data["runs"]:
            columns.append(_label(res, run, len(res.data["runs"])))
            col = {}
            for row in run.get("rows", []):
                lengths.add(row["length"])
                mark = BEYOND if row.get("beyond_trained_length") else ""
                col[row["length"]] = (row.get("error") and "error") or _fmt(row.get(key), fmt) + mark
            cells.append(col)
    rows = [[str(n)] + [c.get(n, "") for c in cells] for n in sorted(lengths)]
    return ("table", ["length", *columns], rows)


def _ruler_blocks(results: list[LoadedResult]) -> list[Block]:
    blocks: list[Block] = []
    summary = []
    for res in results:
        for run in res.data["runs"]:
            label = _label(res, run, len(res.data["runs"]))
            summary.append(
                [
                    label,
                    str(run.get("effective_length") or "none"),
                    _fmt(run.get("wavg_inc"), "{:.1f}"),
                    _fmt(run.get("wavg_dec"), "{:.1f}"),
                ]
            )
            tasks = run.get("tasks", [])
            lengths = [r["length"] for r in run.get("rows", [])]
            header = [
                "task",
                *[
                    f"{n}{BEYOND if r.get('beyond_trained_length') else ''}"
                    for n, r in zip(lengths, run["rows"])
                ],
            ]
            rows = [[t, *[_fmt(r["scores"].get(t), "{:.1f}") for r in run["rows"]]] for t in tasks]
            blocks.append(("p", f"Per task, {label}:"))
            blocks.append(("table", header, rows))
    threshold = next((run.get("threshold") for r in results for run in r.data["runs"]), None)
    head = [
        ("p", f"Effective length: the largest length whose mean exceeds {threshold}."),
        ("table", ["run", "effective length", "wAvg (inc)", "wAvg (dec)"], summary),
    ]
    return head + blocks


def _gen_table(results: list[LoadedResult]) -> Block:
    columns, cols, names = [], [], []
    for res in results:
        for run in res.data["runs"]:
            columns.append(_label(res, run, len(res.data["runs"])))
            m = run.get("metrics", {})
            cols.append(m)
            names += [k for k in m if k not in names]
    return ("table", ["metric", *columns], [[k, *[_fmt(c.get(k), "{:.4f}") for c in cols]] for k in names])


def build_blocks(run_dirs: Sequence[str | Path], title: str, intro: str | None) -> list[Block]:
    loaded, skipped = [], []
    for d in run_dirs:
        found, passed = find_results(d)
        loaded += found
        skipped += passed
    blocks: list[Block] = [("h", 1, title)]
    if intro:
        blocks.append(("p", intro))
    dirs = ", ".join(f"`{d}`" for d in run_dirs)
    if skipped:
        blocks.append(("p", "Not evaluation results, left out: " + ", ".join(f"`{f}`" for f in skipped)))
    blocks.append(
        (
            "p",
            f"Runs: {dirs}. {BEYOND} marks a length beyond the model's trained context "
            "(config max_seq_len x any scaling factor).",
        )
    )
    order = ["ppl", "passkey", "niah", "ruler", "gen"]
    tasks = sorted({r.data["task"] for r in loaded}, key=lambda t: order.index(t) if t in order else 99)
    for task in tasks:
        group = [r for r in loaded if r.data["task"] == task]
        blocks.append(("h", 2, TASK_TITLES.get(task, task)))
        settings = group[0].data.get("settings", {})
        shown = {k: v for k, v in settings.items() if k not in ("ckpts", "out", "func") and v is not None}
        if shown:
            blocks.append(("p", "Settings: " + ", ".join(f"{k}={v}" for k, v in shown.items())))
        if task in HEADLINE:
            key, name, fmt = HEADLINE[task]
            blocks.append(("p", f"{name} per context length:"))
            blocks.append(_length_table(group, key, fmt))
        if task == "ruler":
            blocks += _ruler_blocks(group)
        if task == "gen":
            blocks.append(_gen_table(group))
        images = [
            (f"{r.directory.name}: {p}", r.directory / p) for r in group for p in r.data.get("plots", [])
        ]
        if images:
            blocks.append(("images", images))
    return blocks


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], base: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            header, rows = b[1], b[2]
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        elif b[0] == "images":  # side by side: one table row of images
            imgs = b[1]
            out.append("| " + " | ".join(_md_cell(c) for c, _ in imgs) + " |")
            out.append("|" + "---|" * len(imgs))
            out.append(
                "| " + " | ".join(f"![{_md_cell(c)}]({os.path.relpath(p, base)})" for c, p in imgs) + " |"
            )
        out.append("")
    return "\n".join(out)


def render_html(blocks: list[Block], base: Path, title: str) -> str:
    e = html.escape
    body: list[str] = []
    for b in blocks:
        if b[0] == "h":
            body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b[0] == "images":
            figs = "".join(
                f'<figure><img src="{e(os.path.relpath(p, base))}" alt="{e(c)}">'
                f"<figcaption>{e(c)}</figcaption></figure>"
                for c, p in b[1]
            )
            body.append(f'<div class="row">{figs}</div>')
    style = (
        "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}th{background:#f4f4f4}.row{display:flex;flex-wrap:wrap;gap:12px}"
        "figure{margin:0}img{max-width:640px}figcaption{font-size:0.85em;color:#555}"
    )
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(
    run_dirs: Sequence[str | Path],
    out_md: str | Path,
    title: str = "longctx evaluation report",
    intro: str | None = None,
) -> tuple[Path, Path]:
    """Write the Markdown report to `out_md` and the HTML twin beside it; returns both paths."""
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(run_dirs, title, intro)
    base = out_md.parent.resolve()
    resolved = [
        b if b[0] != "images" else ("images", [(c, Path(p).resolve()) for c, p in b[1]]) for b in blocks
    ]
    out_md.write_text(render_markdown(resolved, base))
    out_html = out_md.with_suffix(".html")
    out_html.write_text(render_html(resolved, base, title))
    return out_md, out_html


# -- `longctx report` ---------------------------------------------------------------------------------
def configure(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Gather the results.json and plots of several `longctx eval` runs into one Markdown "
        "page (plus an HTML copy beside it), tables side by side."
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="--out folder of a `longctx eval` run, or a folder of such folders",
    )
    p.add_argument(
        "--out",
        default="report.md",
        help="Markdown file to write (default: report.md); the HTML goes beside it with a .html suffix",
    )
    p.add_argument("--title", default="longctx evaluation report", help="page title")
    p.add_argument("--intro", default=None, help="a paragraph under the title")


def run(args: argparse.Namespace) -> int:
    md, page = write_report(args.run_dirs, args.out, title=args.title, intro=args.intro)
    print(f"wrote {md} and {page}")
    return 0
