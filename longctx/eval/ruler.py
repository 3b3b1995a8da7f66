"""RULER's synthetic tasks that need no downloaded data (NVIDIA/RULER, arXiv 2404.06654).

Templates, needles, task settings (scripts/synthetic.yaml) and scoring (string_match_all / string_match_part,
x100, after RULER's postprocessing) follow RULER's code. Differences, all forced by "no downloads":
- keys are "adjective-noun" pairs from small built-in word lists (RULER: wonderwords); CWE draws from the
  built-in words, then from pronounceable pseudo-words when a long context needs more (RULER's newer code
  likewise falls back to another list);
- the essay haystack is longctx's built-in essay prose (RULER: Paul Graham's essays), split into sentences
  by a regular expression (RULER: nltk punkt);
Every sample is sized by a binary search on the haystack so that prompt tokens + tokens to generate <= L,
with the model's own tokenizer. The effective context length is the largest length whose mean score over
the tasks exceeds the threshold (85.6: Llama-2-7B's score at 4K, RULER's README).
"""

from __future__ import annotations

import functools
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from longctx.data.tokenizer import Tokenizer
from longctx.errors import ConfigError
from longctx.eval.niah import load_haystack
from longctx.eval.passkey import FILLER as NOISE
from longctx.eval.prompting import GreedyAnswers, beyond_trained_length, cell_rng, largest_fitting
from longctx.model import GPT

# -- RULER's templates (scripts/data/synthetic/constants.py), verbatim, typo included -------------------
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all "
    "the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assgined the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common "
    "words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
    "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
    "text?"
)
FWE_ANSWER_PREFIX = (
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)

DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]  # needle depths (percent)
DEFAULT_THRESHOLD = 85.6

# -- built-in words -----------------------------------------------------------------------------------
ADJECTIVES = """able absent active agile amber ancient angry bitter blue bold brave brief bright broad
brown busy calm careful cheap clean clever cold cool crisp curious damp dark dear deep dense direct dry
dull eager early easy empty equal exact faint fair false famous fancy fast fierce firm flat fresh
friendly full gentle giant glad golden good grand great green grey happy hard heavy hidden high hollow
honest huge humble icy idle jolly keen kind large late lazy light little lively long loud lucky mellow
merry mild modern narrow neat new nimble noble odd old orange pale plain polite proud purple quick quiet
rapid rare red rich rough round royal rusty sad safe salty sharp shiny short silent silver simple slim
slow small smooth soft solid sour spare steady steep sticky still strange strict strong sunny sweet swift
tall tame tender thick thin tidy tiny tough true vast warm weak wet white wide wild wise witty yellow
young""".split()
NOUNS = """acorn anchor apple arrow autumn badge bag ball banjo barn basket beach bean bear bell bench
berry bird blanket boat bone book boot bottle bowl box branch bread brick bridge brook brush bucket
button cabin cable cake camel candle canoe canyon card carpet castle cat cave chair chalk cherry chest
circle cliff clock cloud coat coin comet cookie copper corner cotton crayon crown cup curtain daisy desk
diamond dolphin door dragon drum eagle engine feather fence fern field flag flute forest fountain fox
garden gate ghost glove goat grape guitar hammer harbor hat hill horse island jacket jar kettle key kite
ladder lake lamp leaf lemon letter lion map marble meadow mirror moon mountain needle nest ocean orchard
owl paddle painter parrot pebble pencil piano pillow planet pocket pond quilt rabbit rainbow river robin
rocket saddle sail scarf shadow shell ship shovel spoon star statue stone storm street sugar table tiger
tower train tree trumpet tulip turtle umbrella valley violin wagon wallet whale window wolf""".split()
VERBS = """accept admire answer arrive bake balance borrow bounce breathe build carry catch change chase
clap climb collect cook count cover crawl dance deliver dig dream drift explore fetch fill fold follow
gather glow grow guard guide hang hike hum hurry invent jog juggle jump knit knock laugh launch listen
mend mix move notice open paint pause plant play pour pull push reach read repair rest ring roll rush
sail search shine sing sketch skip sleep slide smile sort spin splash stack stir swim swing talk tease
travel tumble twist visit wander wash watch whistle wiggle wink wonder write yawn""".split()
KEY_WORDS = sorted({f"{a}-{n}" for a in ADJECTIVES for n in NOUNS})  # needle keys, like wonderwords'
PLAIN_WORDS = sorted(set(ADJECTIVES + NOUNS + VERBS))  # CWE's vocabulary
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def pseudo_word(i: int) -> str:
    """The i-th three-syllable pseudo-word ("bababa", "babade", ...): CWE's overflow vocabulary."""
    n = len(_SYLLABLES)
    return _SYLLABLES[(i // n // n) % n] + _SYLLABLES[(i // n) % n] + _SYLLABLES[i % n]


def word_pool(size: int) -> list[str]:
    """`size` distinct words: the built-in list first, then pseudo-words not in it."""
    words = list(PLAIN_WORDS)
    i = 0
    known = set(words)
    while len(words) < size:
        w = pseudo_word(i)
        i += 1
        if w not in known:
            words.append(w)
            known.add(w)
    return words


# -- scoring (RULER scripts/eval/synthetic/constants.py and evaluate.py) -----------------------------
def postprocess(prediction: str) -> str:
    """RULER's postprocess_pred: strip, turn control characters into newlines, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of references found (case-insensitive substring), x100."""
    return (
        sum(sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs))
        / len(preds)
        * 100
    )


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of 1 if any reference is found (RULER's QA metric), x100."""
    return (
        sum(max(float(r.lower() in p.lower()) for r in ref) for p, ref in zip(preds, refs)) / len(preds) * 100
    )


METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}


def effective_length(mean_by_length: dict[int, float], threshold: float = DEFAULT_THRESHOLD) -> int | None:
    """The largest length whose mean score exceeds `threshold` (None when no length does)."""
    passing = [length for length, s in mean_by_length.items() if s > threshold]
    return max(passing) if passing else None


def weighted_average(mean_by_length: dict[int, float], mode: str = "inc") -> float:
    """RULER's wAvg: linear weights 1..n over increasing lengths ("inc") or decreasing ("dec")."""
    if mode not in ("inc", "dec"):
        raise ConfigError(f"weighted average mode must be 'inc' or 'dec', got {mode!r}")
    lengths = sorted(mean_by_length)
    weights = list(range(1, len(lengths) + 1))
    if mode == "dec":
        weights.reverse()
    return sum(w * mean_by_length[length] for w, length in zip(weights, lengths)) / sum(weights)


# -- tasks --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NiahSettings:
    haystack: str  # "noise" (RULER's "repeat"), "essay" or "needle"
    key_type: str  # "words" | "numbers" | "uuids"
    value_type: str
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


@dataclass(frozen=True)
class TaskSpec:
    family: str  # "niah" | "vt" | "cwe" | "fwe"
    tokens_to_generate: int
    metric: str = "string_match_all"
    niah: NiahSettings | None = None


TASKS: dict[str, TaskSpec] = {  # scripts/synthetic.yaml
    "niah_single_1": TaskSpec("niah", 128, niah=NiahSettings("noise", "words", "numbers")),
    "niah_single_2": TaskSpec("niah", 128, niah=NiahSettings("essay", "words", "numbers")),
    "niah_single_3": TaskSpec("niah", 128, niah=NiahSettings("essay", "words", "uuids")),
    "niah_multikey_1": TaskSpec("niah", 128, niah=NiahSettings("essay", "words", "numbers", num_k=4)),
    "niah_multikey_2": TaskSpec("niah", 128, niah=NiahSettings("needle", "words", "numbers")),
    "niah_multikey_3": TaskSpec("niah", 128, niah=NiahSettings("needle", "uuids", "uuids")),
    "niah_multivalue": TaskSpec("niah", 128, niah=NiahSettings("essay", "words", "numbers", num_v=4)),
    "niah_multiquery": TaskSpec("niah", 128, niah=NiahSettings("essay", "words", "numbers", num_q=4)),
    "vt": TaskSpec("vt", 30),
    "cwe": TaskSpec("cwe", 120),
    "fwe": TaskSpec("fwe", 50),
}


@dataclass
class RulerSample:
    task: str
    prompt: str  # template + answer prefix: what the model continues
    context: str  # the haystack with its needles, as placed in the template
    answers: list[str]
    tokens_to_generate: int
    metric: str
    haystack_size: int  # words (essay), lines (noise/needle), list entries (cwe), coded words (fwe)
    needles: list[str] = field(default_factory=list)


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))  # 7 digits
    if kind == "words":
        return rng.choice(KEY_WORDS)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ConfigError(f"unknown needle type {kind!r}")


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _insert_at_depths(units: list[str], items: list[str], depths: Sequence[float]) -> list[str]:
    """RULER's essay insertion: cut the sentence list at int(len * depth / 100), put one item per cut."""
    cuts = [0] + sorted(int(len(units) * d / 100) for d in depths) + [len(units)]
    out: list[str] = []
    for i in range(1, len(cuts)):
        out.append(" ".join(units[cuts[i - 1] : cuts[i]]))
        if i - 1 < len(items):
            out.append(items[i - 1])
    return out


def _niah(
    rng: random.Random, n: int, s: NiahSettings, essay_words: list[str], depths: Sequence[float] | None
) -> tuple[str, str, list[str], list[str]]:
    num_k = max(s.num_k, s.num_q)
    if s.key_type == "words":
        keys = rng.sample(KEY_WORDS, num_k)  # distinct keys (RULER's newer code samples too)
    else:
        keys = [_random_value(rng, s.key_type) for _ in range(num_k)]
    values = [[_random_value(rng, s.value_type) for _ in range(s.num_v)] for _ in keys]
    needles = [
        NEEDLE.format(type_needle_v=s.value_type, key=k, value=v) for k, vs in zip(keys, values) for v in vs
    ]
    rng.shuffle(needles)
    if depths is not None and len(depths) != len(needles):
        raise ConfigError(f"{len(needles)} needles but {len(depths)} depths were given")
    if s.haystack == "essay":
        reps = n // len(essay_words) + 1
        text = " ".join((essay_words * reps)[:n])
        placed = list(depths) if depths is not None else rng.sample(DEPTHS, len(needles))
        context = " ".join(_insert_at_depths(_sentences(text), needles, placed))
    else:
        if s.haystack == "noise":
            lines = [NOISE] * n
        else:  # distractor needles only, none with a real key
            lines = []
            while len(lines) < n:
                k = _random_value(rng, s.key_type)
                if k not in keys:
                    lines.append(
                        NEEDLE.format(
                            type_needle_v=s.value_type, key=k, value=_random_value(rng, s.value_type)
                        )
                    )
        if depths is not None:
            indexes = sorted((int(n * d / 100) for d in depths), reverse=True)
        else:
            indexes = sorted(rng.sample(range(n), len(needles)), reverse=True)
        for index, needle in zip(indexes, needles):
            lines.insert(index, needle)
        context = "\n".join(lines)
    picked = rng.sample(range(num_k), s.num_q)
    queries = [keys[i] for i in picked]
    answers = [a for i in picked for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, type_v = NIAH_TEMPLATE + NIAH_ANSWER_PREFIX, s.value_type
    if s.num_q * s.num_v == 1:  # RULER's singular wording
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        template = template.replace("answers", "answer")
        type_v = type_v[:-1]
    return template.format(type_needle_v=type_v, context=context, query=query), context, answers, needles


def _vt_chain(rng: random.Random, name_len: int, hops: int) -> tuple[list[str], list[str], str]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99998))  # numpy randint(10000, 99999): upper bound exclusive
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, chain, value


def _vt_text(rng: random.Random, n: int, name_len: int, hops: int) -> tuple[str, str, list[str], list[str]]:
    names, chain, value = _vt_chain(rng, name_len, hops)
    lines = [NOISE] * n
    positions = sorted(rng.sample(range(n), len(chain)))
    for j, pos in enumerate(positions):
        lines.insert(pos + j, chain[j])
    context = "\n".join(lines).replace(". \n", ".\n")
    prompt = (VT_TEMPLATE + VT_ANSWER_PREFIX).format(context=context, query=value, num_v=hops + 1)
    return prompt, context, names, chain


def _cwe_list(
    rng: random.Random, num_words: int, common_reps: int, uncommon_reps: int, num_common: int = 10
) -> tuple[str, list[str]]:
    chosen = rng.sample(word_pool(max(num_words, len(PLAIN_WORDS))), num_words)
    common, uncommon = chosen[:num_common], chosen[num_common:]
    entries = common * common_reps + uncommon * uncommon_reps
    rng.shuffle(entries)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries)), common


def _cwe(rng: random.Random, n: int, length: int) -> tuple[str, str, list[str], list[str]]:
    template = CWE_TEMPLATE + CWE_ANSWER_PREFIX
    if length < 4096:  # RULER's short-context setting
        ex_context, ex_answer = _cwe_list(rng, 20, 3, 1)
        context, answer = _cwe_list(rng, n, 6, 1)
    else:
        ex_context, ex_answer = _cwe_list(rng, 40, 10, 3)
        context, answer = _cwe_list(rng, n, 30, 3)
    example = template.format(context=ex_context) + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer))
    return example + "\n" + template.format(context=context), context, answer, []


def _zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta by direct sum plus the Euler-Maclaurin tail (alpha > 1); no scipy needed."""
    k = np.arange(1, terms, dtype=np.float64)
    n = float(terms)
    return float(
        np.sum(k**-alpha) + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha + alpha * n ** (-alpha - 1) / 12
    )


def _fwe(
    rng: random.Random,
    n: int,
    length: int,
    alpha: float = 2.0,
    word_len: int = 6,
) -> tuple[str, str, list[str], list[str]]:
    vocab_size = max(length // 50, 5)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_len)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."  # the top-ranked word is noise
    k = np.arange(1, len(words) + 1)
    counts = (n * k**-alpha / _zeta(alpha)).astype(int)
    text = [w for w, c in zip(words, counts) for _ in range(c)]
    rng.shuffle(text)
    context = " ".join(text)
    return (FWE_TEMPLATE + FWE_ANSWER_PREFIX).format(context=context), context, words[1:4], []


@functools.lru_cache(maxsize=4)
def _essay_words(essay: str | None) -> list[str]:
    return re.sub(r"\s+", " ", essay if essay is not None else load_haystack()).split(" ")


def _vt_example(tokenizer: Tokenizer, seed: int, length: int, index: int) -> str:
    """VT's one in-context example: a chain of 3-letter names in noise, with its answer appended."""

    def make(m: int) -> tuple[str, str, list[str], list[str]]:
        return _vt_text(cell_rng("ruler-vt-example", seed, length, index), m, 3, 4)

    def n_tokens(k: int) -> int:
        return len(tokenizer.encode(make(k)[0]))

    # RULER sizes the example to 500 tokens and falls back to its 5-line minimum when even that is over
    m = largest_fitting(n_tokens, 500, lo=5, hint=8) if n_tokens(5) <= 500 else 5
    prompt, _, names, _ = make(m)
    return prompt + " " + " ".join(names) + "\n"


def build_sample(
    task: str,
    tokenizer: Tokenizer,
    length: int,
    *,
    seed: int = 0,
    index: int = 0,
    depths: Sequence[float] | None = None,
    essay: str | None = None,
) -> RulerSample:
    """One sample of `task` whose prompt tokens + tokens to generate fill `length` as closely as possible.

    depths (percent, one per needle) fixes where NIAH needles go instead of RULER's random draw."""
    if task not in TASKS:
        raise ConfigError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    spec = TASKS[task]
    example = _vt_example(tokenizer, seed, length, index) if spec.family == "vt" else ""

    def make(n: int) -> tuple[str, str, list[str], list[str]]:
        rng = cell_rng("ruler", task, seed, length, index)  # the same draws at every haystack size
        if spec.family == "niah":
            return _niah(rng, n, spec.niah, _essay_words(essay), depths)
        if spec.family == "vt":
            prompt, context, names, chain = _vt_text(rng, n, 5, 4)
            return example + "\n" + prompt, context, names, chain
        if spec.family == "cwe":
            return _cwe(rng, n, length)
        return _fwe(rng, n, length)

    lo = _min_haystack(spec)
    n = largest_fitting(
        lambda k: len(tokenizer.encode(make(k)[0])),
        length - spec.tokens_to_generate,
        lo=lo,
        hint=64,
        what=f"RULER {task} prompt",
    )
    prompt, context, answers, needles = make(n)
    return RulerSample(
        task, prompt, context, list(answers), spec.tokens_to_generate, spec.metric, n, needles=list(needles)
    )


def _min_haystack(spec: TaskSpec) -> int:
    """The smallest haystack a sample can be built with (needles need distinct slots)."""
    if spec.family == "niah":
        s = spec.niah
        return 1 if s.haystack == "essay" else max(s.num_k, s.num_q) * s.num_v
    return {"vt": 5, "cwe": 10, "fwe": 30}[spec.family]


def evaluate_ruler(
    model: GPT,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    tasks: Sequence[str] | None = None,
    samples: int = 5,
    *,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    essay: str | None = None,
    progress: bool = True,
    engine_spec=None,
    label: str = "",
) -> dict:
    """Score of every task at every length (mean of `samples` greedy generations, 0-100), the mean over
    tasks per length, and the effective context length."""
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown RULER task(s) {unknown}; choose from {', '.join(TASKS)}")
    if samples < 1:
        raise ConfigError(f"samples must be positive, got {samples}")
    model.eval()
    answer = GreedyAnswers(model, tokenizer, engine_spec)
    rows, records = [], []
    bar = tqdm(
        total=len(lengths) * len(tasks) * samples,
        desc=f"ruler {label}".strip(),
        unit="sample",
        disable=not progress,
    )
    for length in lengths:
        scores: dict[str, float | None] = {}
        skipped: dict[str, str] = {}
        for task in tasks:
            try:
                scores[task] = _score_task(
                    answer, tokenizer, task, length, samples, seed, essay, bar, records
                )
            except ConfigError as e:  # the task's fixed parts alone exceed this length
                scores[task], skipped[task] = None, str(e)
                bar.update(samples)
        ran = [v for v in scores.values() if v is not None]
        row = {
            "length": length,
            "scores": scores,
            "mean": sum(ran) / len(ran) if ran else None,
            "beyond_trained_length": beyond_trained_length(model, length),
        }
        if skipped:
            row["skipped"] = skipped
        rows.append(row)
        bar.set_postfix(mean="-" if row["mean"] is None else f"{row['mean']:.1f}")
    bar.close()
    # a mean over only some of the tasks is not RULER's score: such lengths do not count below
    means = {r["length"]: r["mean"] for r in rows if r["mean"] is not None and "skipped" not in r}
    return {
        "rows": rows,
        "prompt_cache": answer.engine.prompt_cache_stats(),
        "tasks": tasks,
        "threshold": threshold,
        "effective_length": effective_length(means, threshold),
        "wavg_inc": weighted_average(means, "inc") if means else None,
        "wavg_dec": weighted_average(means, "dec") if means else None,
        "samples": records,
    }


def _score_task(
    answer: GreedyAnswers,
    tokenizer: Tokenizer,
    task: str,
    length: int,
    samples: int,
    seed: int,
    essay: str | None,
    bar: tqdm,
    records: list[dict],
) -> float:
    """The task's score (0-100) at one length over `samples` greedy generations; appends to records."""
    preds, refs = [], []
    for i in range(samples):
        s = build_sample(task, tokenizer, length, seed=seed, index=i, essay=essay)
        pred = postprocess(answer(tokenizer.encode(s.prompt), s.tokens_to_generate))
        preds.append(pred)
        refs.append(s.answers)
        score = METRICS[s.metric]([pred], [s.answers])
        records.append(
            {"length": length, "task": task, "index": i, "output": pred, "answers": s.answers, "score": score}
        )
        bar.update()
    return METRICS[TASKS[task].metric](preds, refs)
