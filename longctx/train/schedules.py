"""Schedules: the learning rate (warmup + cosine) and the context-length curriculum."""

from __future__ import annotations

import math
from dataclasses import dataclass

from longctx.errors import ConfigError


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_ratio * lr` at `total` steps."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class Stage:
    seq_len: int
    start_step: int
    batch_size: int


class Curriculum:
    """A context-length curriculum: `"128:0,256:1000,512:2000"` means length 128 from step 0, 256 from
    step 1000, ... Tokens per optimizer step stay constant (`tokens_per_step`), so the batch shrinks as
    the length grows — each stage sees the same amount of text per update, only in longer pieces."""

    def __init__(self, stages: list[tuple[int, int]], tokens_per_step: int):
        if not stages:
            raise ConfigError("the sequence-length schedule is empty")
        stages = sorted(stages, key=lambda s: s[1])
        if stages[0][1] != 0:
            raise ConfigError(
                f"the sequence-length schedule must start at step 0 (first stage starts at "
                f"{stages[0][1]}); e.g. '128:0,256:1000'"
            )
        self.tokens_per_step = tokens_per_step
        self.stages = []
        for length, start in stages:
            if length <= 0:
                raise ConfigError(f"sequence length {length} in the schedule must be positive")
            if length > tokens_per_step:
                raise ConfigError(
                    f"stage length {length} exceeds the tokens per step ({tokens_per_step} = "
                    "batch size x seq len); raise --batch-size"
                )
            self.stages.append(Stage(length, start, max(1, tokens_per_step // length)))

    @classmethod
    def parse(cls, spec: str | None, seq_len: int, batch_size: int) -> Curriculum:
        """`spec` None -> a single stage at `seq_len`. Tokens per step = batch_size x seq_len."""
        tokens = batch_size * seq_len
        if not spec:
            return cls([(seq_len, 0)], tokens)
        stages = []
        for part in spec.split(","):
            try:
                length, start = part.strip().split(":")
                stages.append((int(length), int(start)))
            except ValueError:
                raise ConfigError(
                    f"bad stage {part!r} in --seq-len-schedule; expected LEN:STEP pairs like '128:0,256:1000'"
                ) from None
        return cls(stages, tokens)

    def at(self, step: int) -> Stage:
        current = self.stages[0]
        for s in self.stages:
            if s.start_step <= step:
                current = s
        return current

    @property
    def max_len(self) -> int:
        return max(s.seq_len for s in self.stages)
