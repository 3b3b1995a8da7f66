"""`longctx eval {ppl,passkey,niah,ruler,gen} CKPT [CKPT...] --out DIR`.

Each task loads every checkpoint in turn, measures it, prints a summary, and writes `DIR/results.json`
(layout in `longctx.eval.report`) plus its plots. Lengths are tokens of each model's own tokenizer; a length
past a model's trained context (config.context_length) runs anyway and is marked `beyond_trained_length`
(except with learned absolute positions, which cannot address it: that row records the error).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from longctx.errors import ConfigError
from longctx.infer.command import add_engine_arguments, engine_spec

TASK_HELP = {
    "ppl": "perplexity vs context length (sliding window with stride, or YaRN's truncate mode)",
    "passkey": "passkey retrieval (Landmark/YaRN/LongLoRA prompt), accuracy per length and depth",
    "niah": "needle in a haystack, substring-scored, length x depth heatmap",
    "ruler": "RULER synthetic tasks (niah variants, vt, cwe, fwe) and the effective context length",
    "gen": "generate from a JSONL file's prompts and score against references (BLEU, ROUGE, exact match)",
}


def parse_lengths(spec: str) -> list[int]:
    """ "256,512,1k,32K" -> [256, 512, 1024, 32768]."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", item)
        if not m:
            raise ConfigError(f"length {item!r} is not a number of tokens (e.g. 512 or 4k)")
        n = int(m.group(1)) * (1024 if m.group(2) else 1)
        if n < 2:
            raise ConfigError(f"length {n} is too short")
        out.append(n)
    return sorted(set(out))


def _floats(spec: str, what: str) -> list[float]:
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{what} must be comma-separated numbers, got {spec!r}") from None


# -- options ------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument(
        "ckpts", nargs="+", metavar="CKPT", help="checkpoint directories (longctx or Hugging Face)"
    )
    p.add_argument(
        "--out", default=None, help=f"output folder for results.json and plots (default eval/{task})"
    )
    p.add_argument(
        "--names", default=None, help="comma-separated labels for the checkpoints (default: folder names)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (keys, depths, needles)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_engine_arguments(p, device_default="auto")


def _lengths_arg(p: argparse.ArgumentParser, default_note: str) -> None:
    p.add_argument(
        "--lengths",
        type=parse_lengths,
        default=None,
        help=f"comma-separated context lengths in tokens, 'k' = 1024 (default: {default_note})",
    )


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    sp = sub.add_parser("ppl", help=TASK_HELP["ppl"], description=TASK_HELP["ppl"])
    _common(sp, "ppl")
    _lengths_arg(sp, "the first model's context x 1/2, 1, 2, 4")
    sp.add_argument(
        "--data",
        default=None,
        help="text source (file, folder, glob, .jsonl, .parquet); default: the embedded stdlib corpus",
    )
    sp.add_argument(
        "--split", choices=["val", "train"], default="val", help="which split of --data (default val)"
    )
    sp.add_argument(
        "--stride",
        type=int,
        default=None,
        help="sliding-window step (default: the length, i.e. disjoint windows; HF docs use half the length)",
    )
    sp.add_argument(
        "--truncate",
        action="store_true",
        help="YaRN mode: each document with >= L tokens cut to L and scored as one window",
    )
    sp.add_argument(
        "--max-windows",
        type=int,
        default=16,
        help="at most this many windows (truncate: documents) per length (default 16; 0 = all)",
    )
    sp.add_argument("--chunk-size", type=int, default=1024, help="positions per logits chunk (memory bound)")
    sp.add_argument(
        "--cache-dir", default=None, help="token cache folder (default $LONGCTX_CACHE or ~/.cache/longctx)"
    )

    sp = sub.add_parser("passkey", help=TASK_HELP["passkey"], description=TASK_HELP["passkey"])
    _common(sp, "passkey")
    _lengths_arg(sp, "the first model's context x 1/2, 1, 2")
    sp.add_argument(
        "--depths",
        default="0,25,50,75,100",
        help="percent of the filler before the key; "
        "'random' draws it per trial as the references do (default 0,25,50,75,100)",
    )
    sp.add_argument("--trials", type=int, default=5, help="random keys per (length, depth) (default 5)")
    sp.add_argument(
        "--max-new-tokens", type=int, default=10, help="generated tokens (default 10, as Landmark)"
    )

    sp = sub.add_parser("niah", help=TASK_HELP["niah"], description=TASK_HELP["niah"])
    _common(sp, "niah")
    _lengths_arg(sp, "the first model's context x 1/2, 1, 2")
    sp.add_argument("--depths", default="0,10,20,30,40,50,60,70,80,90,100", help="needle depths in percent")
    sp.add_argument(
        "--haystack", default=None, help="a text file to use as haystack (default: built-in prose)"
    )
    sp.add_argument(
        "--max-new-tokens", type=int, default=None, help="answer budget (default: answer length + 8)"
    )

    sp = sub.add_parser("ruler", help=TASK_HELP["ruler"], description=TASK_HELP["ruler"])
    _common(sp, "ruler")
    _lengths_arg(sp, "the first model's context x 1/2, 1, 2")
    sp.add_argument(
        "--tasks",
        default=None,
        help="comma-separated tasks (default: all of niah_single_1/2/3, "
        "niah_multikey_1/2/3, niah_multivalue, niah_multiquery, vt, cwe, fwe)",
    )
    sp.add_argument(
        "--samples", type=int, default=5, help="samples per task and length (RULER: 500; default 5)"
    )
    sp.add_argument("--threshold", type=float, default=85.6, help="effective-length threshold (default 85.6)")
    sp.add_argument("--haystack", default=None, help="essay haystack text file (default: built-in prose)")

    sp = sub.add_parser("gen", help=TASK_HELP["gen"], description=TASK_HELP["gen"])
    _common(sp, "gen")
    sp.add_argument("--data", required=True, help='JSONL file: one {"prompt": ..., "reference": ...} a line')
    sp.add_argument("--metric", default="bleu,rouge", help="comma-separated: bleu, rouge, exact_match")
    sp.add_argument("--max-new-tokens", type=int, default=64, help="generated tokens per prompt (default 64)")
    sp.add_argument(
        "--stop",
        action="append",
        default=[],
        help="cut the output at this string (repeatable; e.g. --stop $'\\n')",
    )
    sp.add_argument("--limit", type=int, default=None, help="only the first N records")


# -- running ------------------------------------------------------------------------------------------
def _names(args: argparse.Namespace) -> list[str]:
    if args.names:
        names = [n.strip() for n in args.names.split(",")]
        if len(names) != len(args.ckpts):
            raise ConfigError(f"--names has {len(names)} labels for {len(args.ckpts)} checkpoints")
        return names
    names = [Path(c).resolve().name or str(c) for c in args.ckpts]
    # two checkpoints with the same folder name (run_a/final, run_b/final) get their parent too
    return [
        f"{Path(c).resolve().parent.name}/{n}" if names.count(n) > 1 else n for c, n in zip(args.ckpts, names)
    ]


def _default_lengths(args: argparse.Namespace, factors: tuple[float, ...]) -> list[int]:
    if args.lengths:
        return args.lengths
    from longctx.checkpoint import load_config

    ctx = load_config(args.ckpts[0]).context_length
    return sorted({max(16, int(ctx * f)) for f in factors})


def _addressable(model, length: int) -> bool:
    """Learned absolute positions have no row past their table; every other encoding runs anyway."""
    return model.config.position != "learned" or length <= model.config.max_seq_len


def _split(model, lengths: list[int]) -> tuple[list[int], list[dict]]:
    ok = [n for n in lengths if _addressable(model, n)]
    skipped = [
        {
            "length": n,
            "beyond_trained_length": True,
            "error": f"learned positions stop at {model.config.max_seq_len}; extend the model first",
        }
        for n in lengths
        if n not in ok
    ]
    return ok, skipped


# Each checkpoint's record is saved here as soon as it is measured, so a long multi-checkpoint evaluation
# that is killed keeps what it finished; the same command run again skips those checkpoints. Removed once
# results.json is written.
PARTIAL = "partial.json"


def _resume_key(args: argparse.Namespace) -> str:
    """The settings a kept record must share with this run (the checkpoint list itself may grow)."""
    kept = {k: v for k, v in _settings(args).items() if k not in ("ckpts", "names", "out")}
    return json.dumps(kept, sort_keys=True, default=str)


def _kept_runs(path: Path, key: str) -> dict[tuple[str, str], dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    runs = data.get("runs") if isinstance(data, dict) and data.get("settings") == key else None
    if not isinstance(runs, list):  # other settings, or a damaged file: measure everything again
        return {}
    return {(r.get("name"), r.get("checkpoint")): r for r in runs if isinstance(r, dict)}


def _each_model(args: argparse.Namespace, measure: Callable[..., dict]) -> list[dict]:
    """Load every checkpoint, call measure(model, tokenizer, label), collect one run record each."""
    from longctx.eval.report import write_json_atomic
    from longctx.infer.engine import load_engine

    partial, key = _out(args) / PARTIAL, _resume_key(args)
    kept = _kept_runs(partial, key)
    spec, runs = engine_spec(args), []
    for ckpt, name in zip(args.ckpts, _names(args)):
        if (name, str(ckpt)) in kept:
            runs.append(kept[(name, str(ckpt))])
            if not args.quiet:
                print(f"{name}: kept from an interrupted run ({partial})", file=sys.stderr)
            continue
        engine = load_engine(ckpt, spec, args.device)
        model, tokenizer = engine.model, engine.tokenizer
        t0 = time.perf_counter()
        result = measure(model, tokenizer, name)
        seconds = time.perf_counter() - t0
        if not args.quiet:
            print(f"{name}: measured in {seconds:.0f} s", file=sys.stderr)
        runs.append(
            {
                "name": name,
                "checkpoint": str(ckpt),
                "context_length": model.config.context_length,
                "parameters": model.num_parameters(),
                "seconds": round(seconds, 2),
                **result,
            }
        )
        write_json_atomic(partial, {"settings": key, "runs": runs})
        del model
    return runs


def _merge_rows(rows: list[dict], skipped: list[dict]) -> list[dict]:
    return sorted(rows + skipped, key=lambda r: r["length"])


def _settings(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("command", "quiet")}


def _out(args: argparse.Namespace) -> Path:
    out = Path(args.out or Path("eval") / args.eval_task)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _print_rows(runs: list[dict], key: str, fmt: str) -> None:
    for run in runs:
        cells = []
        for r in run["rows"]:
            v = "error" if r.get("error") else "-" if r.get(key) is None else fmt.format(r[key])
            cells.append(f"{r['length']}{'†' if r.get('beyond_trained_length') else ''}={v}")
        print(f"{run['name']} ({key}): " + "  ".join(cells))


def _series(runs: list[dict], key: str) -> dict:
    return {r["name"]: ([x["length"] for x in r["rows"]], [x.get(key) for x in r["rows"]]) for r in runs}


def run_ppl(args: argparse.Namespace) -> dict:
    from longctx.data.cache import token_file
    from longctx.eval.plots import line_plot
    from longctx.eval.ppl import perplexities

    lengths = _default_lengths(args, (0.5, 1, 2, 4))
    if args.stride is not None and args.stride > min(lengths):
        raise ConfigError(f"--stride {args.stride} is longer than the shortest length {min(lengths)}")

    def measure(model, tokenizer, name):
        tokens = token_file(args.data, tokenizer, args.split, cache_dir=args.cache_dir)
        ok, skipped = _split(model, lengths)
        rows = perplexities(
            model,
            tokens,
            ok,
            stride=args.stride,
            truncate=args.truncate,
            max_windows=args.max_windows or None,
            eos_id=tokenizer.eos_id,
            chunk_size=args.chunk_size,
            progress=not args.quiet,
        )
        return {"rows": _merge_rows(rows, skipped)}

    runs = _each_model(args, measure)
    _print_rows(runs, "ppl", "{:.3f}")
    out = _out(args)
    mode = "truncate" if args.truncate else f"stride {args.stride or 'L'}"
    png = line_plot(
        _series(runs, "ppl"),
        out / "ppl.png",
        xlabel="context length (tokens)",
        ylabel="perplexity",
        title=f"Perplexity vs length ({mode})",
        logy=True,
        trained={r["name"]: r["context_length"] for r in runs},
    )
    return {"task": "ppl", "runs": runs, "plots": [png], "out": out}


def run_passkey(args: argparse.Namespace) -> dict:
    from longctx.eval.passkey import evaluate_passkey, parse_depths
    from longctx.eval.plots import line_plot

    lengths, depths = _default_lengths(args, (0.5, 1, 2)), parse_depths(args.depths)

    def measure(model, tokenizer, name):
        ok, skipped = _split(model, lengths)
        res = evaluate_passkey(
            model,
            tokenizer,
            ok,
            depths,
            args.trials,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            progress=not args.quiet,
            label=name,
            engine_spec=engine_spec(args),
        )
        return {**res, "rows": _merge_rows(res["rows"], skipped)}

    runs = _each_model(args, measure)
    _print_rows(runs, "accuracy", "{:.2f}")
    out = _out(args)
    plots = [
        line_plot(
            _series(runs, "accuracy"),
            out / "passkey.png",
            xlabel="context length (tokens)",
            ylabel="accuracy",
            title="Passkey retrieval",
            ylim=(-0.05, 1.05),
            trained={r["name"]: r["context_length"] for r in runs},
        )
    ]
    plots += _depth_heatmaps(runs, depths, out, "passkey_heatmap", "Passkey", label="accuracy")
    return {"task": "passkey", "runs": runs, "plots": plots, "out": out}


def _depth_heatmaps(
    runs: list[dict], depths: list[float], out: Path, stem: str, title: str, **kw
) -> list[Path]:
    """One length x depth heatmap per checkpoint (rows' `by_depth` scores), as `<stem>_<i>.png`."""
    from longctx.eval.plots import heatmap

    plots = []
    for i, r in enumerate(runs):
        rows = [x for x in r["rows"] if "by_depth" in x]
        grid = [[x["by_depth"][str(d)] for x in rows] for d in depths]
        plots.append(
            heatmap(
                grid,
                [x["length"] for x in rows],
                depths,
                out / f"{stem}_{i}.png",
                title=f"{title}: {r['name']}",
                trained=r["context_length"],
                **kw,
            )
        )
    return plots


def run_niah(args: argparse.Namespace) -> dict:
    from longctx.eval.niah import evaluate_niah, load_haystack

    lengths, depths = _default_lengths(args, (0.5, 1, 2)), _floats(args.depths, "depths")
    if any(not 0 <= d <= 100 for d in depths):
        raise ConfigError("--depths are percents in [0, 100]")
    haystack = load_haystack(args.haystack)

    def measure(model, tokenizer, name):
        ok, skipped = _split(model, lengths)
        res = evaluate_niah(
            model,
            tokenizer,
            ok,
            depths,
            haystack=haystack,
            max_new_tokens=args.max_new_tokens,
            progress=not args.quiet,
            label=name,
            engine_spec=engine_spec(args),
        )
        return {**res, "rows": _merge_rows(res["rows"], skipped)}

    runs = _each_model(args, measure)
    _print_rows(runs, "score", "{:.2f}")
    out = _out(args)
    plots = _depth_heatmaps(runs, depths, out, "niah", "Needle in a haystack")
    return {"task": "niah", "runs": runs, "plots": plots, "out": out}


def run_ruler(args: argparse.Namespace) -> dict:
    from longctx.eval.niah import load_haystack
    from longctx.eval.plots import line_plot
    from longctx.eval.ruler import evaluate_ruler

    lengths = _default_lengths(args, (0.5, 1, 2))
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    essay = load_haystack(args.haystack) if args.haystack else None

    def measure(model, tokenizer, name):
        ok, skipped = _split(model, lengths)
        res = evaluate_ruler(
            model,
            tokenizer,
            ok,
            tasks,
            args.samples,
            seed=args.seed,
            threshold=args.threshold,
            essay=essay,
            progress=not args.quiet,
            label=name,
            engine_spec=engine_spec(args),
        )
        return {**res, "rows": _merge_rows(res["rows"], skipped)}

    runs = _each_model(args, measure)
    _print_rows(runs, "mean", "{:.1f}")
    for r in runs:
        print(f"{r['name']}: effective length {r['effective_length'] or 'none'} (threshold {args.threshold})")
    out = _out(args)
    png = line_plot(
        _series(runs, "mean"),
        out / "ruler.png",
        xlabel="context length (tokens)",
        ylabel="mean score (0-100)",
        title="RULER",
        ylim=(-3, 103),
        threshold=args.threshold,
        trained={r["name"]: r["context_length"] for r in runs},
    )
    return {"task": "ruler", "runs": runs, "plots": [png], "out": out}


def run_gen(args: argparse.Namespace) -> dict:
    from longctx.eval.genmetrics import evaluate_generation, load_records, parse_metrics

    metrics = parse_metrics(args.metric)
    records = load_records(args.data)[: args.limit]

    def measure(model, tokenizer, name):
        return evaluate_generation(
            model,
            tokenizer,
            records,
            metrics,
            max_new_tokens=args.max_new_tokens,
            stop=args.stop,
            progress=not args.quiet,
            label=name,
            engine_spec=engine_spec(args),
        )

    runs = _each_model(args, measure)
    for r in runs:
        print(f"{r['name']}: " + "  ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items()))
    return {"task": "gen", "runs": runs, "plots": [], "out": _out(args)}


RUNNERS = {"ppl": run_ppl, "passkey": run_passkey, "niah": run_niah, "ruler": run_ruler, "gen": run_gen}


def run(args: argparse.Namespace) -> int:
    from longctx.eval.report import save_results

    torch.manual_seed(args.seed)
    result = RUNNERS[args.eval_task](args)
    path = save_results(result["out"], result["task"], result["runs"], _settings(args), result["plots"])
    (Path(result["out"]) / PARTIAL).unlink(missing_ok=True)
    print(f"wrote {path}" + "".join(f", {p}" for p in result["plots"]))
    return 0
