"""Training batches from a token stream, as the `Trainer` asks for them: `train(step, index)`, a pure
function of (seed, step, index) — a resumed run draws exactly the batches of an uninterrupted one — and a
fixed set of `validation(step)` batches (the same at every evaluation, at the current length).

`stage(step) -> (seq_len, batch_size)` says the shape at a step (a context-length curriculum); every
transform (retrieval samples mixed in, MLM masking) is a pure function of (batch, seed, index) too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from longctx.data.packing import sample_batch

Batch = dict[str, torch.Tensor]
Transform = Callable[[Batch, int, int], Batch]  # (batch, seed, index) -> batch
VAL_SEED_OFFSET = 10_007  # validation draws its own stream of the same seed


class TokenBatches:
    def __init__(
        self,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray | None,
        stage: Callable[[int], tuple[int, int]],
        *,
        seed: int,
        eos_id: int | None,
        restart_positions: bool = False,
        transforms: Sequence[Transform] = (),
        val_batches: int = 4,
        train_only: Sequence[Transform] = (),
    ):
        """transforms apply to training and validation batches (MLM masking); train_only to training
        batches alone (the retrieval mix)."""
        self.train_tokens, self.val_tokens, self.stage = train_tokens, val_tokens, stage
        self.seed, self.eos_id, self.restart_positions = seed, eos_id, restart_positions
        self.transforms, self.train_only, self.val_batches = list(transforms), list(train_only), val_batches

    def train(self, step: int, index: int) -> Batch:
        seq_len, batch_size = self.stage(step)
        batch = sample_batch(
            self.train_tokens,
            seq_len,
            batch_size,
            seed=self.seed,
            step=index,
            eos_id=self.eos_id,
            restart_positions=self.restart_positions,
        )
        for t in [*self.train_only, *self.transforms]:
            batch = t(batch, self.seed, index)
        return batch

    def validation(self, step: int) -> list[Batch]:
        if self.val_tokens is None:
            return []
        seq_len, batch_size = self.stage(step)
        seed = self.seed + VAL_SEED_OFFSET
        out = []
        for i in range(self.val_batches):
            batch = sample_batch(self.val_tokens, seq_len, batch_size, seed=seed, step=i)
            for t in self.transforms:
                batch = t(batch, seed, i)
            out.append(batch)
        return out
