"""Passkey retrieval, as in Landmark Attention, YaRN and LongLoRA (all three share the prompt).

Five parts joined by "\\n": the preamble, filler[:p], the key line, filler[:n-p], the question. The filler
sentence is repeated and sliced by characters from its start, both times (as the reference scripts do).
Here n (filler characters) is sized so the prompt is `length` tokens of the model's own tokenizer, and
p = round(n * depth / 100) puts the key at the asked depth (the references draw p uniformly: ask for
depth "random" to do the same). Greedy decoding; correct when the first integer in the output is the key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from longctx.data.tokenizer import Tokenizer
from longctx.errors import ConfigError
from longctx.eval.prompting import GreedyAnswers, beyond_trained_length, cell_rng, largest_fitting
from longctx.model import GPT

PREAMBLE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
MAX_KEY = 50000  # key = randint(1, 50000) as in Landmark / YaRN
MAX_NEW_TOKENS = 10  # Landmark's max_new_tokens


def key_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def filler(n_chars: int) -> str:
    """The first n characters of the filler sentence repeated with spaces (the references' garbage_inf)."""
    reps = n_chars // (len(FILLER) + 1) + 1
    return " ".join([FILLER] * reps)[:n_chars]


def passkey_text(n_filler: int, n_prefix: int, key: int) -> str:
    garbage = filler(n_filler)
    return "\n".join([PREAMBLE, garbage[:n_prefix], key_line(key), garbage[: n_filler - n_prefix], QUESTION])


@dataclass
class PasskeyPrompt:
    text: str
    ids: list[int]
    key: int
    depth: float  # percent of the filler before the key line
    filler_chars: int
    prefix_chars: int


def _prefix(n_filler: int, depth: float) -> int:
    return round(n_filler * depth / 100.0)


def build_prompt(tokenizer: Tokenizer, length: int, depth: float, key: int) -> PasskeyPrompt:
    """The passkey prompt whose token count is as close to `length` as possible without exceeding it.

    depth in [0, 100]: percent of the filler placed before the key line."""
    if not 0.0 <= depth <= 100.0:
        raise ConfigError(f"depth must be a percent in [0, 100], got {depth}")

    def n_tokens(n: int) -> int:
        return len(tokenizer.encode(passkey_text(n, _prefix(n, depth), key)))

    n = largest_fitting(n_tokens, length, hint=length, what="passkey prompt")
    text = passkey_text(n, _prefix(n, depth), key)
    return PasskeyPrompt(text, tokenizer.encode(text), key, depth, n, _prefix(n, depth))


def first_integer(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def is_correct(output: str, key: int) -> bool:
    """The references' rule: the first run of digits in the output equals the key."""
    return first_integer(output) == key


def parse_depths(spec: str | Sequence[float]) -> list[float | str]:
    """ "0,25,50,75,100" -> [0.0, 25.0, ...]; "random" -> ["random"] (uniform depth per trial)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[float | str] = []
    for item in items:
        if str(item).strip() == "random":
            out.append("random")
            continue
        try:
            d = float(item)
        except ValueError:
            raise ConfigError(f"depth {item!r} is not a number (percent) or 'random'") from None
        if not 0.0 <= d <= 100.0:
            raise ConfigError(f"depth {d} is outside [0, 100] (percent of the filler before the key)")
        out.append(d)
    return out


def evaluate_passkey(
    model: GPT,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float | str] = (0, 25, 50, 75, 100),
    trials: int = 5,
    *,
    seed: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
    engine_spec=None,
    label: str = "",
) -> dict:
    """Accuracy per length and per depth over `trials` random keys per (length, depth) cell."""
    if trials < 1:
        raise ConfigError(f"trials must be positive, got {trials}")
    model.eval()
    answer = GreedyAnswers(model, tokenizer, engine_spec)
    rows, samples = [], []
    bar = tqdm(
        total=len(lengths) * len(depths) * trials,
        desc=f"passkey {label}".strip(),
        unit="prompt",
        disable=not progress,
    )
    for length in lengths:
        by_depth = {}
        for depth in depths:
            hits = 0
            for trial in range(trials):
                rng = cell_rng("passkey", seed, length, depth, trial)
                key = rng.randint(1, MAX_KEY)
                d = rng.uniform(0.0, 100.0) if depth == "random" else float(depth)
                prompt = build_prompt(tokenizer, length, d, key)
                output = answer(prompt.ids, max_new_tokens)
                ok = is_correct(output, key)
                hits += ok
                samples.append(
                    {
                        "length": length,
                        "depth": round(d, 2),
                        "key": key,
                        "output": output,
                        "correct": ok,
                        "prompt_tokens": len(prompt.ids),
                    }
                )
                bar.update()
            by_depth[str(depth)] = hits / trials
        rows.append(
            {
                "length": length,
                "accuracy": sum(by_depth.values()) / len(by_depth),
                "by_depth": by_depth,
                "beyond_trained_length": beyond_trained_length(model, length),
            }
        )
        bar.set_postfix(acc=f"{rows[-1]['accuracy']:.2f}")
    bar.close()
    accuracy_by_depth = {str(d): sum(r["by_depth"][str(d)] for r in rows) / len(rows) for d in depths}
    return {
        "rows": rows,
        "prompt_cache": answer.engine.prompt_cache_stats(),
        "accuracy_by_depth": accuracy_by_depth,
        "accuracy": sum(r["accuracy"] for r in rows) / len(rows),
        "samples": samples,
    }
