"""ALiBi (Press et al., 2022): no position vectors, a per-head linear penalty -m_h * (i - j) on the
attention scores. It is defined for any distance, so it extrapolates as is."""

from __future__ import annotations

import math

import torch

from longctx.positions.base import PositionConfig, Positions, register


def alibi_slopes(n_head: int) -> torch.Tensor:
    """The paper's geometric slopes: 2^(-8i/n) for i = 1..n when n is a power of two; otherwise the slopes
    of the nearest lower power of two, then every other slope of the next power (the reference code)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_head).is_integer():
        slopes = power_of_two(n_head)
    else:
        m = 2 ** math.floor(math.log2(n_head))
        slopes = power_of_two(m) + power_of_two(2 * m)[0::2][: n_head - m]
    return torch.tensor(slopes, dtype=torch.float32)


@register("alibi")
class ALiBi(Positions):
    def __init__(self, config: PositionConfig):
        super().__init__(config)
        self.register_buffer("slopes", alibi_slopes(config.n_head), persistent=False)

    @property
    def alibi_slopes(self) -> torch.Tensor:
        return self.slopes
