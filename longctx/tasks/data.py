"""Task data: JSONL records -> truncated token sequences -> padded batches.

Records are one JSON object per line: `{"text": ..., "label": ...}` for classification,
`{"prompt": ..., "completion": ...}` for generation (QA, summarisation, dialogue turns).

Truncation keeps `max_len` tokens of an input that is longer (the LongBench convention, see
shared/reference/long-context-evals.md): `head` keeps the first tokens (the end is cut), `tail` keeps the last
tokens (the start is cut), `middle` keeps the first half and the last half (the middle is cut) — LongBench's
default, since instructions sit at the start and the question at the end of a long prompt.

Batches are right-padded: with a causal decoder a real token never attends to a later pad, so no mask is
needed; the encoder masks pad keys (`longctx.attention.KeyMask.from_lengths`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from longctx.data.packing import IGNORE_INDEX
from longctx.data.tokenizer import Tokenizer
from longctx.errors import ConfigError, DataError

TRUNCATIONS = ("head", "tail", "middle")
Label = str | int


def truncate(ids: Sequence[int], max_len: int, how: str) -> list[int]:
    """Keep at most `max_len` tokens: head (first), tail (last) or middle (first half + last half)."""
    if how not in TRUNCATIONS:
        raise ConfigError(f"unknown truncation {how!r}; choose one of {', '.join(TRUNCATIONS)}")
    if max_len <= 0:
        raise ConfigError(f"the length budget must be positive, got {max_len}")
    ids = list(ids)
    if len(ids) <= max_len:
        return ids
    if how == "head":
        return ids[:max_len]
    if how == "tail":
        return ids[len(ids) - max_len :]
    first = max_len // 2  # LongBench: prompt[:half] + prompt[-half:]; an odd budget gives the tail one more
    return ids[:first] + ids[len(ids) - (max_len - first) :]


class LabelMap:
    """Labels (strings or ints, as in the file) <-> class ids 0..C-1, in sorted order (ints before
    strings) so the same label set always gives the same ids, whatever order the file lists them in."""

    def __init__(self, labels: Sequence[Label]):
        self.labels: list[Label] = sorted(set(labels), key=lambda v: (isinstance(v, str), v))
        if len(self.labels) < 2:
            raise DataError(f"classification needs at least 2 distinct labels, found {self.labels}")
        self._ids = {v: i for i, v in enumerate(self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    def id(self, label: Label, where: str = "") -> int:
        if label not in self._ids:
            raise DataError(
                f"label {label!r}{where} was not seen in the training data "
                f"(known: {self.labels}); add examples of it to the training file"
            )
        return self._ids[label]

    def to_list(self) -> list[Label]:
        return list(self.labels)


@dataclass
class ClassifyExample:
    ids: list[int]  # truncated to max_len
    label: int
    cut: bool  # the text was longer than max_len


@dataclass
class GenerateExample:
    prompt: list[int]  # truncated so that prompt + completion fit max_len (training)
    completion: list[int]  # ends with the tokenizer's eos, so the model learns where to stop
    reference: str
    prompt_full: list[int]  # untruncated (evaluation truncates it to leave room for the answer)


def classify_examples(
    records: Sequence[dict], tokenizer: Tokenizer, labels: LabelMap, max_len: int, how: str, source: str = ""
) -> list[ClassifyExample]:
    out = []
    for i, r in enumerate(records):
        full = tokenizer.encode(r["text"])
        if not full:
            raise DataError(f"{source} record {i + 1} has an empty text")
        out.append(
            ClassifyExample(
                truncate(full, max_len, how),
                labels.id(r["label"], f" ({source} record {i + 1})"),
                len(full) > max_len,
            )
        )
    return out


def generate_examples(
    records: Sequence[dict], tokenizer: Tokenizer, max_len: int, how: str, source: str = ""
) -> list[GenerateExample]:
    """The completion is kept whole (it is what the loss is on); the prompt is truncated to what is left."""
    out = []
    for i, r in enumerate(records):
        completion = tokenizer.encode(r["completion"]) + [tokenizer.eos_id]
        budget = max_len - len(completion)
        if budget < 1:
            raise DataError(
                f"{source} record {i + 1}: the completion alone takes {len(completion)} tokens, "
                f"no room for the prompt in --max-len {max_len}; raise --max-len"
            )
        prompt = tokenizer.encode(r["prompt"])
        out.append(GenerateExample(truncate(prompt, budget, how), completion, r["completion"], prompt))
    return out


def batch_indices(n: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
    """Example indices of a training step: a pure function of (seed, step), like `sample_batch`, so a run
    is reproducible whatever happened before the step."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(n, size=min(batch_size, n), replace=False)


def collate_classify(examples: Sequence[ClassifyExample], pad_id: int) -> dict[str, torch.Tensor]:
    """-> input_ids (B, T) right-padded, lengths (B,), labels (B,)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
    return {
        "input_ids": ids,
        "lengths": torch.tensor([len(e.ids) for e in examples]),
        "labels": torch.tensor([e.label for e in examples]),
    }


def collate_generate(examples: Sequence[GenerateExample], pad_id: int) -> dict[str, torch.Tensor]:
    """-> input_ids (B, T), labels (B, T): label t is token t+1 of prompt+completion, and IGNORE_INDEX
    wherever token t+1 is a prompt token or padding — the loss is on the completion only."""
    seqs = [e.prompt + e.completion for e in examples]
    T = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for b, (s, e) in enumerate(zip(seqs, examples)):
        row = torch.tensor(s)
        ids[b, : len(s) - 1] = row[:-1]
        first = len(e.prompt) - 1  # the input position whose next token is the completion's first
        labels[b, first : len(s) - 1] = row[first + 1 :]
    return {"input_ids": ids, "labels": labels}
