"""The demo report's pieces: the machine line, tables of results by length, binomial intervals, and a small
Markdown-to-HTML renderer (no dependency)."""

from __future__ import annotations

import math
import os
import platform

import torch

from longctx.demo.stages import rows
from longctx.device import cpu_flags, cpu_name


def machine() -> str:
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{cpu_name()} ({', '.join(flags) or 'no AVX2'}), {os.cpu_count()} cores{gpu}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion k/n (sound at small n and at 0 or 1, unlike k/n +- 2 sd)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def length_table(res: dict | None, names: list[str], lengths: list[int], key: str, fmt: str) -> list[str]:
    """| model | L1 | L2 | ... | with † on lengths past what the model's configuration addresses."""
    lines = ["| model | " + " | ".join(str(L) for L in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for n in names:
        by_length = rows(res, n)
        cells = []
        for L in lengths:
            r = by_length.get(L)
            v = None if r is None else r.get(key)
            cells.append(
                "–" if v is None else fmt.format(v) + ("†" if r.get("beyond_trained_length") else "")
            )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def to_html(markdown: str, title: str) -> str:
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
