"""The evaluation plots (matplotlib, Agg backend, PNG).

Lengths past a model's trained context are drawn as hollow markers after a dashed vertical line, and
carry a dagger on heatmap ticks, so a reader never mistakes extrapolation for the trained range.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# the needle-in-a-haystack heatmap colours (gkamradt's notebook): red -> yellow -> green
NIAH_COLORS = ("#F0496E", "#EBB839", "#0CD79F")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    trained: dict[str, int] | None = None,
    logy: bool = False,
    ylim: tuple[float, float] | None = None,
    threshold: float | None = None,
) -> Path:
    """One line per series (x = context length, log2 axis). trained[label] = that model's context length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    trained = trained or {}
    for i, (label, (xs, ys)) in enumerate(series.items()):
        color = f"C{i % 10}"
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=color, label=label)
        limit = trained.get(label)
        inside = [p for p in pts if limit is None or p[0] <= limit]
        beyond = [p for p in pts if limit is not None and p[0] > limit]
        ax.plot([p[0] for p in inside], [p[1] for p in inside], "o", color=color)
        if beyond:
            ax.plot([p[0] for p in beyond], [p[1] for p in beyond], "o", mfc="white", color=color)
        if limit is not None and beyond:
            ax.axvline(limit, color=color, ls="--", lw=1, alpha=0.7)
    if threshold is not None:
        ax.axhline(threshold, color="grey", ls=":", lw=1, label=f"threshold {threshold:g}")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log", base=2)
    ticks = sorted({x for xs, _ in series.values() for x in xs})
    ax.set_xticks(ticks, [str(t) for t in ticks])  # the lengths themselves, not powers of two
    ax.xaxis.set_minor_formatter(NullFormatter())
    if logy:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel + ("  (hollow: beyond trained length)" if trained else ""))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def heatmap(
    grid: Sequence[Sequence[float]],
    lengths: Sequence[int],
    depths: Sequence[float | str],
    path: str | Path,
    *,
    title: str = "",
    trained: int | None = None,
    label: str = "score",
) -> Path:
    """grid[i][j] = score (0-1) at depth i, length j. Depth on rows (0% at the top), length on columns."""
    from matplotlib.colors import LinearSegmentedColormap

    plt = _pyplot()
    cmap = LinearSegmentedColormap.from_list("niah", list(NIAH_COLORS))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(lengths) + 2), max(3.5, 0.45 * len(depths) + 1.5)))
    im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)))
    ax.set_xticklabels(
        [f"{n}\u2020" if trained is not None and n > trained else str(n) for n in lengths], rotation=45
    )
    ax.set_yticks(range(len(depths)))
    ax.set_yticklabels([d if isinstance(d, str) else f"{d:g}" for d in depths])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black")
    if trained is not None:
        inside = [j for j, n in enumerate(lengths) if n <= trained]
        if inside and len(inside) < len(lengths):
            ax.axvline(max(inside) + 0.5, color="black", ls="--", lw=1.5)
    ax.set_xlabel("Token Limit" + (" (\u2020 beyond trained length)" if trained is not None else ""))
    ax.set_ylabel("Depth Percent")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
