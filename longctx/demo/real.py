"""The demo's real-model track: a pretrained model (SmolLM2-135M-Instruct, trained at 8192, from
`longctx pull`) read past its trained length with training-free methods, and measured.

1. probe: prefill two prompts to learn this machine's speed (seconds = a·L + b·L², fitted), then choose the
   largest plan that fits the time left (`PLANS`, richest first; `--full` takes the richest whatever it
   costs) and write down why;
2. extend: `longctx extend MODEL --method M --factor F --steps 0` for each method (no training);
3. perplexity on held-out standard-library files, passkey retrieval (trials x depths per length, with 95%
   intervals in the report), RULER's multi-key needle and variable tracking where the plan has room, a
   needle-in-a-haystack heatmap for the method with the lowest perplexity at the target;
4. a reference column: transformers' own implementation of `none` and `yarn` (rope_scaling) on the same
   passkey prompts, so the numbers are the field's and not only ours.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from longctx.demo.report import length_table, wilson
from longctx.demo.stages import Stage, results, rows

MODEL = "smollm2-135m-instruct"
# attention time of each method relative to plain (bench/context_methods_speed.py, AMD EPYC, 16K-32K: 1.04-1.21);
# a bound on the whole prefill's ratio, whose projections and MLP are the same for every method
METHOD_COST = {"none": 1.0, "yarn": 1.0, "ntk": 1.0, "dual-chunk": 1.1, "self-extend": 1.2, "rerope": 1.2}
# in bf16 where the bf16 attention kernels run (AVX512-BF16, no AMX) the context methods' region passes run
# on them: a 12000-token SmolLM2 prefill on a 2-core AMD EPYC Zen 5, plain 13.9 s, self-extend 16.9 s,
# dual-chunk 18.2 s
BF16_KERNEL_METHOD_COST = {"dual-chunk": 1.3, "self-extend": 1.2, "rerope": 1.2}
# in bf16 elsewhere (and fp16) they prefill on fp32 copies of q, k, v through the fp32 kernels: this demo's
# passkey stage (2048 and 16384 tokens, 12 prompts each) in bf16 on Zen 5 before the bf16 region passes:
# self-extend 343 s, dual-chunk 349 s, yarn 140 s, the 16K prompts ~50 s against ~20
HALF_METHOD_COST = {"dual-chunk": 2.5, "self-extend": 2.5, "rerope": 2.5}
STAGE_OVERHEAD_S = 8.0  # a command's start: loading the model and the tokenizer
PASSKEY_METHODS = ("none", "yarn")  # the ones transformers implements too (the reference column)


@dataclass(frozen=True)
class PasskeyGrid:
    """Passkey prompts at every length x depth, `trials` keys each: one `longctx eval passkey`."""

    lengths: tuple[float, ...]  # in units of the trained length
    depths: tuple[int, ...]
    trials: int
    best_only: bool = False  # `none` and the method of lowest perplexity at the target only (after ppl)


@dataclass(frozen=True)
class RealPlan:
    name: str
    factor: int
    methods: tuple[str, ...]  # "none" is the pulled model as it is
    ppl_lengths: tuple[float, ...]  # in units of the trained length; one window each, shorter ones free
    passkey: tuple[PasskeyGrid, ...]  # the first holds the shortest length (the reference column's)
    niah_depths: tuple[int, ...] = ()  # at the target, best method; () = none
    ruler_samples: int = 0  # per task and length (niah_multikey_1, vt) at the passkey lengths; 0 = none
    reference_trials: int = 0  # transformers column: none and yarn, shortest passkey length, middle depth
    finetune_steps: int = 0  # a short YaRN + LoRA fine-tune (GPU plans)

    def lengths(self, trained: int, which: tuple[float, ...]) -> list[int]:
        return sorted({int(trained * f) for f in which})

    def passkey_lengths(self, trained: int) -> list[int]:
        return self.lengths(trained, tuple(f for g in self.passkey for f in g.lengths))

    @property
    def reference_depth(self) -> int:
        depths = self.passkey[0].depths
        return depths[len(depths) // 2]


G = PasskeyGrid
PLANS = [  # richest first: the probe takes the first that fits the time left
    RealPlan("gpu", 4, ("none", "yarn", "ntk", "self-extend", "dual-chunk", "rerope"), (0.5, 1, 2, 4),
             (G((0.5, 1, 2, 4), (10, 30, 50, 70, 90), 4),), (0, 25, 50, 75, 100), 10, 4, finetune_steps=100),
    RealPlan("full", 4, ("none", "yarn", "ntk", "self-extend", "dual-chunk", "rerope"), (0.5, 1, 2, 4),
             (G((0.5, 1, 2, 4), (10, 50, 90), 4),), (0, 50, 100), 5, 2),
    RealPlan("standard", 2, ("none", "yarn", "ntk", "self-extend", "dual-chunk"), (0.5, 1, 2),
             (G((0.5, 1, 2), (10, 50, 90), 3),), (0, 50, 100), 3, 2),
    RealPlan("lean", 2, ("none", "yarn", "self-extend", "dual-chunk"), (1, 2), (G((0.25, 2), (10, 50, 90), 2),),
             reference_trials=2),
    RealPlan("small", 2, ("none", "yarn", "self-extend", "dual-chunk"), (1, 2), (G((0.25, 2), (50,), 2),),
             reference_trials=2),
    # passkey past the trained length at one depth: 30%, since SmolLM2 misses keys near the question (depths
    # 70-90) even inside its trained length (docs/extend.md), and a depth's later trials reuse the haystack
    RealPlan("tight", 2, ("none", "yarn", "self-extend"), (0.5, 1, 2), (G((0.25, 2), (30,), 2),),
             reference_trials=2),
    # a 2-core AVX2 machine (1.6-2.1 ms a token, ~0.24 us a token^2): three depths inside the trained length,
    # then one key at 1.5x it for `none` and the method the perplexity chose: at 1.25x (10240) `none` still
    # retrieved, at 1.5x not; a 16K prompt takes ~90-100 s
    RealPlan("brief", 2, ("none", "yarn", "self-extend"), (1, 2),
             (G((0.25,), (10, 50, 90), 1), G((1.5,), (30,), 1, best_only=True)), reference_trials=1),
    RealPlan("minimal", 2, ("none", "yarn", "self-extend"), (1, 2), (G((0.25,), (10, 50, 90), 2),), reference_trials=2),
]  # fmt: skip


@dataclass
class Speed:
    """Prefill seconds of an L-token prompt on this machine: a·L + b·L² (weights, then attention)."""

    a: float
    b: float
    probes: list[tuple[int, float]]  # (tokens, seconds) of the timed prefill
    dtype: str
    attention: tuple[int, float] | None = None  # (tokens, seconds) of every layer's attention alone

    def seconds(self, length: float) -> float:
        return self.a * length + self.b * length * length


def attention_seconds(model, length: int, chunk: int) -> float:
    """One layer's causal attention over `length` tokens, `chunk` queries at a time against the keys so far
    (as a chunked prefill reads its cache), on random q/k/v of the model's shapes, dtype and device."""
    import torch

    from longctx.attention.dispatch import attention

    c, w = model.config, model.head_weight
    q = torch.randn(1, c.n_head, length, c.head_dim, dtype=w.dtype, device=w.device)
    k, v = (torch.randn(1, c.n_kv_head, length, c.head_dim, dtype=w.dtype, device=w.device) for _ in range(2))
    sync = torch.cuda.synchronize if w.device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, length, chunk):
            attention(q[:, :, s : s + chunk], k[:, :, : s + chunk], v[:, :, : s + chunk], causal=True,
                      q_offset=s, backend=c.attn_backend, chunk_size=c.attn_chunk_size)  # fmt: skip
    sync()
    return time.perf_counter() - t0


def probe(model: str, device: str, length: int = 4096, attention_length: int = 8192) -> Speed:
    """Time the prefill of one prompt of standard-library code, and one layer's attention alone at a longer
    length: b = the layers' attention seconds / L², a = the prompt's seconds less its attention, per token.

    Why not fit both terms from two prefills (1024 and 4096, as before): b came from the difference of
    their per-token times, where attention is a small part, so noise on a shared host moved it a lot --
    SmolLM2 on a 2-core AMD EPYC: 16K predicted 54 s in one demo and 80 in another, where a 16K prefill
    takes ~90. Timed apart at 8192, attention is 15.8 s of a 29 s prefill, and 4096's prefill with 8192's
    attention predicted 16384 within 2% (89.4 s against 91.4). The first prefill, untimed, takes the
    process's one-off costs (kernels loaded, buffers allocated)."""
    import torch

    from longctx.data.sources import stdlib_files
    from longctx.infer.engine import EngineSpec, load_engine
    from longctx.infer.generate import prefill

    chunk = 1024
    engine = load_engine(model, EngineSpec(dtype="auto", prefill_chunk=chunk), device)
    ids: list[int] = []
    for f in stdlib_files():
        ids += engine.tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= length:
            break
    times = []
    for n in (256, length):  # the first, untimed: the one-off costs of a process's first prefill
        cache = engine.cache_for(1, n)
        t0 = time.perf_counter()
        with torch.inference_mode():
            prefill(engine.model, cache, torch.tensor([ids[:n]], device=engine.device), chunk)
        times.append((n, time.perf_counter() - t0))
    n, t = times[-1]
    layers = engine.model.config.n_layer
    attn = layers * attention_seconds(engine.model, attention_length, chunk)
    b = attn / attention_length**2
    a = max(1e-9, (t - b * n * n) / n)
    return Speed(a, b, [(n, t)], str(engine.dtype).replace("torch.", ""), (attention_length, attn))


def method_cost(method: str, dtype: str) -> float:
    """A method's prefill time relative to plain attention's, in the model's dtype on this machine."""
    if dtype != "float32":
        from longctx.attention import cpu_flash

        half = (
            BF16_KERNEL_METHOD_COST if dtype == "bfloat16" and cpu_flash.bf16_kernels() else HALF_METHOD_COST
        )
        if method in half:
            return half[method]
    return METHOD_COST.get(method, 1.0)


def estimate(plan: RealPlan, speed: Speed, trained: int) -> float:
    """Seconds the plan's evaluations take (prefill-bound), from the fitted speed."""
    t = speed.seconds
    cost = {m: method_cost(m, speed.dtype) for m in plan.methods}
    total = STAGE_OVERHEAD_S * (len(plan.methods) + 3 + len(plan.passkey))
    # one window per length, all beginning at the data's start: the shorter ones are read from the longest
    total += sum(cost.values()) * t(max(plan.lengths(trained, plan.ppl_lengths))) * 1.1  # + the loss
    for grid in plan.passkey:
        priced = plan.methods
        if grid.best_only:  # `none` and one other, priced as the costliest
            priced = ("none", max((m for m in plan.methods if m != "none"), key=cost.__getitem__))
        for L in plan.lengths(trained, grid.lengths):
            # the prompt cache: a depth's later trials prefill only what follows the shared haystack
            per_depth = [t(L) + (grid.trials - 1) * (t(L) - t(L * d / 100)) for d in grid.depths]
            total += sum(per_depth) * sum(cost[m] for m in priced)
    total += 2 * plan.ruler_samples * sum(t(L) for L in plan.passkey_lengths(trained)) * sum(cost.values())
    target = trained * plan.factor
    total += len(plan.niah_depths) * t(target) * max(cost.values())
    total += 2 * plan.reference_trials * t(min(plan.passkey_lengths(trained)))
    total += plan.finetune_steps * 3 * t(target)  # forward + backward
    return total


def choose(speed: Speed, budget_s: float, trained: int, device: str, full: bool) -> tuple[RealPlan, str]:
    """The first plan (richest first) whose estimate fits the budget, and a sentence saying why."""
    gpu = device.startswith("cuda")
    options = PLANS if gpu else [p for p in PLANS if not p.finetune_steps]
    head = (
        f"this machine prefills {speed.probes[-1][0]} tokens in {speed.probes[-1][1]:.1f} s ({speed.dtype}); "
        f"16K would take ~{speed.seconds(16384):.0f} s, 32K ~{speed.seconds(32768):.0f} s"
    )
    if full:
        plan = options[0]
        return (
            plan,
            f"{head}; --full asked for the `{plan.name}` plan (~{estimate(plan, speed, trained) / 60:.0f} min)",
        )
    for plan in options:
        need = estimate(plan, speed, trained)
        if need <= budget_s:
            return (
                plan,
                f"{head}; the `{plan.name}` plan needs ~{need / 60:.1f} min of the {budget_s / 60:.1f} left",
            )
    plan = options[-1]
    need = estimate(plan, speed, trained)
    return plan, (
        f"{head}; even the `{plan.name}` plan needs ~{need / 60:.1f} min, more than the {budget_s / 60:.1f} "
        "left: it runs anyway (the demo takes longer than 15 minutes here)"
    )


# -- stages ---------------------------------------------------------------------------------------------
def plan_path(root: Path) -> Path:
    return root / "probe" / "plan.json"


def probe_stage(root: Path, model: str, device: str, budget_s: float, full: bool) -> Stage:
    def run() -> None:
        from longctx.checkpoint import load_config

        trained = load_config(model).max_seq_len
        speed = probe(model, device)
        plan, why = choose(speed, budget_s, trained, device, full)
        plan_path(root).parent.mkdir(parents=True, exist_ok=True)
        record = {
            "plan": asdict(plan),
            "why": why,
            "trained": trained,
            "speed": asdict(speed),
            "model": model,
        }
        plan_path(root).write_text(json.dumps(record, indent=2) + "\n")
        print(f"  {why}")

    return Stage("probe speed, choose the plan", root / "probe", fn=run, weight=0.5)


def load_plan(root: Path) -> tuple[RealPlan, dict]:
    record = json.loads(plan_path(root).read_text())
    p = record["plan"]
    if "passkey" not in p:  # written before the grids (an interrupted demo of an older version)
        p["passkey"] = [{k: p.pop(f) for k, f in (("lengths", "passkey_lengths"), ("depths", "depths"),
                                                  ("trials", "trials"))}]  # fmt: skip
    p["passkey"] = tuple(PasskeyGrid(**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()})
                         for g in p["passkey"])  # fmt: skip
    plan = RealPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})
    return plan, record


def passkey_dirs(root: Path, plan: RealPlan) -> list[tuple[PasskeyGrid, Path]]:
    """Each grid's output folder: eval/passkey for the first, eval/passkey-2, ... after."""
    ev = root / "eval"
    return [(g, ev / ("passkey" if i == 0 else f"passkey-{i + 1}")) for i, g in enumerate(plan.passkey)]


def passkey_results(root: Path, plan: RealPlan) -> dict | None:
    """Every grid's results as one: each method's rows and samples together, the plots as paths under
    eval/ (None before any grid ran)."""
    found = [(d, r) for _, d in passkey_dirs(root, plan) if (r := results(d))]
    if not found:
        return None
    runs: dict[str, dict] = {}
    for _, res in found:
        for run in res.get("runs", []):
            into = runs.setdefault(run["name"], {**run, "rows": [], "samples": []})
            into["rows"] += run.get("rows", [])
            into["samples"] += run.get("samples", [])
    return {
        "runs": list(runs.values()),
        "plots": [f"{d.name}/{p}" for d, res in found for p in res.get("plots", [])],
    }


def stages(root: Path, device: str) -> list[Stage]:
    plan, record = load_plan(root)
    model, trained = record["model"], record["trained"]
    target = trained * plan.factor
    ckpts = {m: (model if m == "none" else str(root / m)) for m in plan.methods}
    names = ",".join(plan.methods)
    dev = ["--device", device, "--dtype", "auto", "--prefill-chunk", "1024"]
    out = []
    for m in plan.methods:
        if m == "none":
            continue
        out.append(Stage(f"extend {m}", root / m, argv=["extend", model, "--method", m, "--factor", str(plan.factor),
                                                       "--seq-len", str(target), "--steps", "0", "--out", str(root / m)],
                         weight=0.3))  # fmt: skip
    if plan.finetune_steps:
        ft = root / "yarn-lora"
        out.append(Stage("fine-tune yarn + LoRA", ft, argv=["extend", model, "--method", "yarn", "--factor",
                   str(plan.factor), "--seq-len", str(target), "--steps", str(plan.finetune_steps), "--lora",
                   "--out", str(ft), "--device", device], weight=3.0))  # fmt: skip
        ckpts["yarn+lora"] = str(ft)
        names += ",yarn+lora"
    every = list(ckpts.values())
    lengths = ",".join(map(str, plan.lengths(trained, plan.ppl_lengths)))
    pk_lengths = ",".join(map(str, plan.passkey_lengths(trained)))
    ev = root / "eval"
    out.append(Stage("eval ppl", ev / "ppl", argv=["eval", "ppl", *every, "--names", names, "--lengths", lengths,
                     "--max-windows", "1", "--out", str(ev / "ppl"), *dev], weight=2.0))  # fmt: skip

    def best(with_none: bool):
        """A stage's `prepare`: BEST -> the checkpoint of the method of lowest perplexity at the target (the
        ppl stage has run), after `none`'s if asked; their names appended."""

        def fill(argv: list[str]) -> list[str]:
            chosen = list(dict.fromkeys(["none"] * with_none + [best_method(root, plan, trained)]))
            i = argv.index("BEST")
            return argv[:i] + [ckpts[m] for m in chosen] + argv[i + 1 :] + ["--names", ",".join(chosen)]

        return fill

    for grid, d in passkey_dirs(root, plan):
        at = ",".join(map(str, plan.lengths(trained, grid.lengths)))
        who = ["BEST"] if grid.best_only else [*every, "--names", names]
        out.append(Stage(f"eval passkey at {at}" + " (none, best)" * grid.best_only, d, argv=["eval", "passkey",
                         *who, "--lengths", at, "--depths", ",".join(map(str, grid.depths)), "--trials",
                         str(grid.trials), "--out", str(d), *dev], weight=3.0,
                         prepare=best(with_none=True) if grid.best_only else None))  # fmt: skip
    if plan.ruler_samples:
        out.append(Stage("eval ruler", ev / "ruler", argv=["eval", "ruler", *every, "--names", names, "--lengths",
                         pk_lengths, "--tasks", "niah_multikey_1,vt", "--samples", str(plan.ruler_samples),
                         "--out", str(ev / "ruler"), *dev], weight=2.0))  # fmt: skip
    if plan.niah_depths:
        out.append(Stage("eval niah (best method)", ev / "niah", argv=["eval", "niah", "BEST", "--lengths",
                         str(target), "--depths", ",".join(map(str, plan.niah_depths)), "--out", str(ev / "niah"),
                         *dev], weight=1.0, prepare=best(with_none=False)))  # fmt: skip
    if plan.reference_trials:
        out.append(Stage("transformers reference", root / "reference",
                         fn=lambda: reference(root, plan, record, ckpts), weight=1.0))  # fmt: skip
    return out


def best_method(root: Path, plan: RealPlan, trained: int) -> str:
    """The method with the lowest perplexity at the target length (none when nothing was measured)."""
    ppl = results(root / "eval" / "ppl")
    target = trained * plan.factor
    scored = [(r[target]["ppl"], m) for m in plan.methods if (r := rows(ppl, m)).get(target, {}).get("ppl")]
    return min(scored)[1] if scored else plan.methods[-1]


# -- the transformers reference column ------------------------------------------------------------------
def reference(root: Path, plan: RealPlan, record: dict, ckpts: dict[str, str]) -> None:
    """Passkey with transformers' own model code (and its rope_scaling for yarn) on the very prompts
    `longctx eval passkey` used at the shortest length and the plan's middle depth; -> reference/results.json."""
    out = root / "reference"
    out.mkdir(parents=True, exist_ok=True)
    try:
        import transformers  # noqa: F401
    except ImportError:
        (out / "results.json").write_text(json.dumps({"skipped": "transformers is not installed"}) + "\n")
        return
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from longctx.checkpoint import export_to_hf, load_tokenizer
    from longctx.eval.passkey import MAX_NEW_TOKENS, first_integer, is_correct

    ours = results(root / "eval" / "passkey") or {}
    length = plan.passkey_lengths(record["trained"])[0]
    tok = load_tokenizer(record["model"])
    depth = plan.reference_depth
    report = {"length": length, "depth": depth, "methods": {}}
    for name in PASSKEY_METHODS:
        samples = [s for run in ours.get("runs", []) if run["name"] == name for s in run.get("samples", [])
                   if s["length"] == length and round(s["depth"]) == depth][: plan.reference_trials]  # fmt: skip
        if not samples:
            continue
        rows_ = []
        with tempfile.TemporaryDirectory() as tmp:
            export_to_hf(ckpts[name], Path(tmp) / "hf")
            hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
            from longctx.eval.passkey import build_prompt

            for s in samples:
                prompt = build_prompt(tok, length, float(s["depth"]), s["key"])
                with torch.inference_mode():
                    gen = hf.generate(torch.tensor([prompt.ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                      eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)  # fmt: skip
                text = tok.decode([t for t in gen[0, len(prompt.ids) :].tolist() if t != tok.eos_id])
                rows_.append({"key": s["key"], "ours": s["correct"], "transformers": is_correct(text, s["key"]),
                              "same_answer": first_integer(text) == first_integer(s["output"]),
                              "output": text})  # fmt: skip
            del hf
        report["methods"][name] = rows_
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")


# -- the report -----------------------------------------------------------------------------------------
def _passkey_table(pk: dict | None, names: list[str], lengths: list[int]) -> list[str]:
    """Accuracy with its 95% interval and n per length."""
    lines = ["| method | " + " | ".join(str(L) for L in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for n in names:
        by_length = rows(pk, n)
        run = next((r for r in (pk or {}).get("runs", []) if r["name"] == n), {})
        cells = []
        for L in lengths:
            ok = [s["correct"] for s in run.get("samples", []) if s["length"] == L]
            if not ok:
                cells.append("–")
                continue
            lo, hi = wilson(sum(ok), len(ok))
            mark = "†" if by_length.get(L, {}).get("beyond_trained_length") else ""
            cells.append(f"{sum(ok) / len(ok):.2f}{mark} [{lo:.2f}, {hi:.2f}] n={len(ok)}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def effective_lengths(pk: dict | None, names: list[str], trained: int) -> dict[str, int | None]:
    """RULER's effective length on passkey accuracy: the longest length whose accuracy stays >= 0.85 x the
    base model's at the shortest length measured (4K in RULER; here the shortest in the plan)."""
    base = rows(pk, "none")
    if not base:
        return {}
    threshold = 0.85 * base[min(base)]["accuracy"]
    out = {}
    for n in names:
        ok = [
            L
            for L, r in sorted(rows(pk, n).items())
            if r.get("accuracy") is not None and r["accuracy"] >= threshold
        ]
        out[n] = max(ok) if ok else None
    return out


def section(root: Path) -> list[str]:
    if not plan_path(root).exists():
        return []
    plan, record = load_plan(root)
    trained, model = record["trained"], record["model"]
    target = trained * plan.factor
    names = list(plan.methods) + (["yarn+lora"] if plan.finetune_steps else [])
    ppl, niah, ruler = (results(root / "eval" / t) for t in ("ppl", "niah", "ruler"))
    pk = passkey_results(root, plan)
    md = [
        f"## A real model past its trained length: {model}, {trained} -> {target} tokens",
        "",
        f"The pulled model (trained at {trained} tokens) read at up to {target} with training-free methods, "
        f"factor {plan.factor}: `none` (as it is), "
        + ", ".join(f"`{m}`" for m in plan.methods if m != "none")
        + ". Plan: "
        + record["why"]
        + ".",
        "",
    ]
    md += [f"- {v}" for v in verdicts(plan, trained, ppl, pk)] + [""]
    md += ["### Perplexity on held-out standard-library files (one window per length; lower is better)", "",
           *length_table(ppl, names, plan.lengths(trained, plan.ppl_lengths), "ppl", "{:.3f}"), "",
           "† past the trained length.", ""]  # fmt: skip
    pk_lengths = plan.passkey_lengths(trained)
    grids = "; ".join(
        f"{', '.join(map(str, plan.lengths(trained, g.lengths)))}: depth{'s' * (len(g.depths) > 1)} "
        f"{', '.join(map(str, g.depths))}%, {g.trials} trial{'s' * (g.trials > 1)} each"
        for g in plan.passkey
    )
    md += [f"### Passkey accuracy ({grids}; 95% Wilson interval)", "", *_passkey_table(pk, names, pk_lengths),
           ""]  # fmt: skip
    if max(pk_lengths) <= trained:
        far = min(L for p in PLANS for L in p.passkey_lengths(trained) if L > trained)
        md += [f"This plan has no passkey past the trained {trained} tokens (a {far}-token prompt costs "
               f"~{Speed(**record['speed']).seconds(far):.0f} s here); the `brief` plan and richer ones do: a "
               "faster machine (native bf16, a GPU) or `longctx demo --full`.", ""]  # fmt: skip
    eff = effective_lengths(pk, names, trained)
    if eff and len(pk_lengths) > 1:

        def told(n: str, v: int | None) -> str:
            unmeasured = [L for L in pk_lengths if L > (v or 0) and L not in rows(pk, n)]
            said = str(v) if v else f"< {min(pk_lengths)}"
            return f"`{n}` {said}" + (
                f" (not measured at {', '.join(map(str, unmeasured))})" if unmeasured else ""
            )

        md += ["Effective length (RULER's rule on passkey accuracy: the longest length scoring >= 0.85 x `none` "
               f"at {min(pk_lengths)}): " + ", ".join(told(n, v) for n, v in eff.items()), ""]  # fmt: skip
    if ruler:
        md += ["### RULER (niah_multikey_1, vt; mean score 0-100)", "",
               *length_table(ruler, names, pk_lengths, "mean", "{:.1f}"), ""]  # fmt: skip
    ref = results(root / "reference")
    if ref and "methods" in ref:
        md += [f"### Reference: transformers on the same prompts ({ref['length']} tokens, depth {ref['depth']})", "",
               "| method | longctx correct | transformers correct | same answer |", "|---|---:|---:|---:|"]  # fmt: skip
        for m, rs in ref["methods"].items():
            same = sum(r["same_answer"] for r in rs)
            md.append(f"| {m} | {sum(r['ours'] for r in rs)}/{len(rs)} | {sum(r['transformers'] for r in rs)}/{len(rs)} "
                      f"| {same}/{len(rs)} |")  # fmt: skip
        md.append("")
    elif ref:
        md += [f"Reference column: {ref.get('skipped')}.", ""]
    plots = [f"ppl/{p}" for p in (ppl or {}).get("plots", [])] + (pk or {}).get("plots", [])
    plots += [f"niah/{p}" for p in (niah or {}).get("plots", [])]
    md += [line for p in plots for line in (f"![{p.split('/')[0]}]({root.name}/eval/{p})", "")]
    return md


def verdicts(plan: RealPlan, trained: int, ppl: dict | None, pk: dict | None) -> list[str]:
    """Plain sentences from the measured numbers: which method helped past the trained length, which not."""
    target = trained * plan.factor
    out = []
    base = rows(ppl, "none")
    at = {m: rows(ppl, m).get(target, {}).get("ppl") for m in plan.methods}
    inside = {m: rows(ppl, m).get(trained, {}).get("ppl") for m in plan.methods}
    if at.get("none") is not None and base.get(trained, {}).get("ppl") is not None:
        out.append(f"`none` scores perplexity {base[trained]['ppl']:.2f} at its trained {trained} and "
                   f"{at['none']:.2f} at {target}.")  # fmt: skip
    scored = sorted((v, m) for m, v in at.items() if v is not None and m != "none")
    if scored:
        best_v, best = scored[0]
        out.append(f"Lowest perplexity at {target}: `{best}` ({best_v:.2f}); " + ", ".join(
            f"`{m}` {v:.2f}" for v, m in scored[1:]) + ".")  # fmt: skip
        hurt = [m for m in plan.methods if m != "none" and inside.get(m) and inside.get("none")
                and inside[m] > inside["none"] * 1.03]  # fmt: skip
        if hurt:
            out.append("Inside the trained length these cost perplexity (> 3% worse than `none` at "
                       f"{trained}): " + ", ".join(f"`{m}` {inside[m]:.2f} vs {inside['none']:.2f}" for m in hurt)
                       + " - RoPE scalings stretch every position, the window methods leave short ones exact.")  # fmt: skip
    longest = max(plan.passkey_lengths(trained))
    accs = {m: rows(pk, m).get(longest, {}).get("accuracy") for m in plan.methods}
    if any(v is not None for v in accs.values()):
        out.append(f"Passkey accuracy at {longest}: " + ", ".join(
            f"`{m}` {v:.2f}" for m, v in accs.items() if v is not None) + " (intervals in the table).")  # fmt: skip
    return out
