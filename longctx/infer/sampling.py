"""Choosing the next token: greedy, temperature, top-k, top-p (nucleus), repetition penalty, with a seeded
`torch.Generator` per request so a seed reproduces a completion exactly.

The processors follow Hugging Face's order and definitions (repetition penalty -> temperature -> top-k ->
top-p), so a setting means the same here as in `transformers.generate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from longctx.errors import ConfigError


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 -> greedy (argmax)
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off
    repetition_penalty: float = 1.0  # 1 -> off; HF/CTRL definition
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_ids: set[int] = field(default_factory=set)  # stop tokens (e.g. eos; not included in the text)
    seed: int | None = None

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            need(
                math.isfinite(getattr(self, name)),
                f"{name} must be a finite number, got {getattr(self, name)}",
            )
        need(self.temperature >= 0.0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        need(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        need(self.seed is None or -(2**63) <= self.seed < 2**64, f"seed must fit in 64 bits, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def repetition_penalty(logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (V,), prev_ids (n,) -> logits where every token already seen is made less likely: a positive
    logit is divided by `penalty`, a negative one multiplied (Keskar et al. 2019; HF's definition)."""
    if penalty == 1.0 or prev_ids.numel() == 0:
        return logits
    seen = logits.gather(0, prev_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(0, prev_ids, seen)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value kept, like HF), the rest -> -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cum <= (1.0 - p)  # the low tail whose total mass is at most 1 - p
    drop_sorted[..., -1] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()  # non-deterministic, from the OS
    else:
        g.manual_seed(int(seed))
    return g


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    prev_ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> int:
    """logits (V,) of the next position, prev_ids (n,) the prompt and tokens so far -> the chosen id."""
    logits = repetition_penalty(logits.float(), prev_ids, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = top_p_filter(top_k_filter(logits / params.temperature, params.top_k), params.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
