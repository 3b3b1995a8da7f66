"""The training-free methods' table from `bench/real_model_methods.sh`'s folder (or several folders):
perplexity per length, passkey accuracy per length with n and the 95% Wilson interval, the seconds each
passkey run took, and which depths were retrieved at each length.

    python bench/methods_table.py runs/methods [MORE_FOLDERS ...]

It reads every `results.json` below the folders (`ppl/`, `passkey-*/NAME/`), so a run still going or cut off
prints what has finished.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from longctx.demo.report import wilson

ORDER = ["none", "yarn", "ntk", "self-extend", "dual-chunk", "rerope"]


def load(folders: list[Path]) -> tuple[dict, dict, dict]:
    """-> ({name: {length: ppl}}, {(name, length): [(depth, correct)]}, {(name, length): seconds})"""
    ppl, samples, seconds = defaultdict(dict), defaultdict(list), defaultdict(float)
    for folder in folders:
        for f in sorted(folder.rglob("results.json")):
            res = json.loads(f.read_text())
            for run in res.get("runs", []):
                if res.get("task") == "ppl":
                    ppl[run["name"]].update({row["length"]: row["ppl"] for row in run["rows"]})
                elif res.get("task") == "passkey":
                    lengths = {s["length"] for s in run["samples"]}
                    for s in run["samples"]:
                        samples[run["name"], s["length"]].append((int(s["depth"]), bool(s["correct"])))
                    for L in lengths:  # a run at one length (the script's layout) times that length
                        seconds[run["name"], L] += run.get("seconds", 0.0) / len(lengths)
    return ppl, samples, seconds


def depths(cell: list[tuple[int, bool]]) -> str:
    by = defaultdict(list)
    for d, ok in cell:
        by[d].append(ok)
    return " ".join(f"{d}:{sum(v)}/{len(v)}" for d, v in sorted(by.items()))


def table(ppl: dict, samples: dict, seconds: dict) -> list[str]:
    names = sorted({*ppl, *(n for n, _ in samples)}, key=lambda n: (ORDER + [n]).index(n))
    ppl_lengths = sorted({L for p in ppl.values() for L in p})
    pk_lengths = sorted({L for _, L in samples})
    head = [f"ppl {L}" for L in ppl_lengths] + [f"passkey {L}" for L in pk_lengths]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for n in names:
        cells = [f"{ppl[n][L]:.3f}" if L in ppl.get(n, {}) else "–" for L in ppl_lengths]
        for L in pk_lengths:
            ok = [c for _, c in samples.get((n, L), [])]
            if not ok:
                cells.append("–")
                continue
            lo, hi = wilson(sum(ok), len(ok))
            cells.append(f"{sum(ok)}/{len(ok)} [{lo:.2f}, {hi:.2f}] {seconds[n, L]:.0f} s")
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    lines += ["", "passkey cells: correct/n [95% Wilson interval] and the run's seconds; by depth (percent):"]
    lines += [
        f"- `{n}` at {L}: {depths(samples[n, L])}" for n in names for L in pk_lengths if (n, L) in samples
    ]
    return lines


def main(argv: list[str]) -> int:
    folders = [Path(a) for a in argv]
    if not folders or not all(f.is_dir() for f in folders):
        print(
            "usage: python bench/methods_table.py FOLDER [FOLDER ...]  (folders of results.json)",
            file=sys.stderr,
        )
        return 2
    print("\n".join(table(*load(folders))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
