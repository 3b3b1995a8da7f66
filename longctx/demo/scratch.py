"""The demo's from-scratch track, on the embedded corpus (Python's own sources):

1. train the `small` preset (RoPE) with a context-length curriculum up to L0 = 256, with a share of
   synthetic passkey samples so the model learns to retrieve at all;
2. extend it to 8·L0 = 2048 with `none`, `linear` and `yarn`, each with the same short fine-tune;
3. evaluate every model: perplexity vs length, passkey accuracy, a needle-in-a-haystack heatmap for the
   best method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from longctx.demo.report import length_table
from longctx.demo.stages import Stage, results, rows


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
        train_steps=120,
        batch_size=8,
        lr=2e-3,
        extend_steps=15,
        extend_batch=1,
        methods=("none", "linear", "yarn"),
        ppl_lengths=(256, 512, 1024, 2048, 4096),
        ppl_windows=2,
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


def _cmd(name: str, argv: list[str], out: Path, weight: float) -> Stage:
    return Stage(name, out, argv=argv, weight=weight)


def stages(plan: Plan, root: Path, device: str) -> list[Stage]:
    base = root / "base"
    L = plan.L0 * plan.factor
    ckpts = {"base": base, **{m: root / f"extend-{m}" for m in plan.methods}}
    dev = ["--device", device]
    lens = ",".join(map(str, plan.ppl_lengths))
    out = [
        _cmd(
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
            _cmd(
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
        _cmd(
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
        _cmd(
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
        _cmd(
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
    # an interrupted training run continues from its last checkpoint
    out[0].prepare = lambda argv: argv + (["--resume"] if (base / "trainer_state.json").exists() else [])

    def niah_target(argv: list[str]) -> list[str]:  # the heatmap is for the best method, known only now
        best = best_method(root, plan)
        argv[argv.index("BEST")] = str(root / f"extend-{best}")
        return argv + ["--names", best]

    out[-1].prepare = niah_target
    return out


def best_method(root: Path, plan: Plan) -> str:
    """The extended model with the lowest perplexity at the extended length (ties: first listed)."""
    ppl = results(root / "eval" / "ppl")
    L = plan.L0 * plan.factor
    scored = []
    for m in plan.methods:
        row = rows(ppl, m).get(L)
        if row and row.get("ppl") is not None:
            scored.append((float(row["ppl"]), m))
    return min(scored)[1] if scored else plan.methods[-1]


def verdicts(root: Path, plan: Plan) -> list[str]:
    """Plain sentences on what each method did, from the measured numbers (no wishful thinking)."""
    ppl = results(root / "eval" / "ppl")
    pk = results(root / "eval" / "passkey")
    L0, L = plan.L0, plan.L0 * plan.factor
    out = []
    base = rows(ppl, "base")
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
        at_L = rows(ppl, m).get(L, {}).get("ppl")
        at_L0 = rows(ppl, m).get(L0, {}).get("ppl")
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
        acc = [r.get("accuracy") for r in rows(pk, m).values() if r.get("accuracy") is not None]
        if acc:
            s += f"; mean passkey accuracy {sum(acc) / len(acc):.2f}"
        out.append(s + ".")
    accs = [r.get("accuracy") for n in ("base", *plan.methods) for r in rows(pk, n).values()]
    if accs and not any(accs):
        out.append(
            "No model retrieved a single passkey: this training budget is too small for the model to learn "
            "retrieval (the synthetic samples in training were not enough), so the passkey numbers say "
            "nothing about the methods here; a longer `longctx train` run is the fix."
        )
    return out


def section(root: Path, plan: Plan) -> list[str]:
    """The track's part of the report (Markdown lines)."""
    names = ["base", *plan.methods]
    ppl, pk, niah = (results(root / "eval" / t) for t in ("ppl", "passkey", "niah"))
    L = plan.L0 * plan.factor
    md = [
        f"## From scratch: from {plan.L0} to {L} tokens",
        "",
        f"A `{plan.preset}` GPT (RoPE, byte-level tokens) was trained on Python's standard-library sources "
        f"with a context-length curriculum up to L0 = {plan.L0}, then extended {plan.factor}x to {L} "
        f"with {', '.join(f'`{m}`' for m in plan.methods)}, each fine-tuned for {plan.extend_steps} steps at "
        f"{L}. `none` keeps the original RoPE and only fine-tunes; `linear` is position interpolation; "
        "`yarn` is NTK-by-parts interpolation with attention temperature (see docs).",
        "",
    ]
    md += [f"- {v}" for v in verdicts(root, plan)] + [""]
    md += [
        "### Perplexity vs context length (validation files; lower is better)",
        "",
        *length_table(ppl, names, list(plan.ppl_lengths), "ppl", "{:.2f}"),
        "",
        "† beyond the length the model's position configuration addresses.",
        "",
        "### Passkey retrieval accuracy",
        "",
        *length_table(pk, names, list(plan.passkey_lengths), "accuracy", "{:.2f}"),
        "",
    ]
    for res, sub in ((ppl, "ppl"), (pk, "passkey"), (niah, "niah")):
        for p in (res or {}).get("plots", []):
            md += [f"![{sub}]({root.name}/eval/{sub}/{p})", ""]
    return md
