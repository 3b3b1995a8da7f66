"""Packing a token stream into fixed-length training batches.

`sample_batch(tokens, seq_len, batch_size, seed, step)` is a pure function of (seed, step): a resumed run
draws exactly the batches the uninterrupted run would have drawn. Each row is a window of seq_len+1
tokens at a random offset; documents inside it are separated by the eos token. With
`restart_positions=True` positions restart at 0 after every separator (each document sees positions from
its own start, as when documents are trained alone).
"""

from __future__ import annotations

import numpy as np
import torch

from longctx.errors import DataError

IGNORE_INDEX = -100  # a label that takes no loss (prompt tokens, padding, unmasked MLM positions)


def document_positions(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) -> (B, T) positions that restart at 0 on the token after each eos."""
    B, T = ids.shape
    idx = torch.arange(T, device=ids.device).expand(B, T)
    is_start = torch.zeros_like(ids, dtype=torch.bool)
    is_start[:, 1:] = ids[:, :-1] == eos_id
    start = torch.where(is_start, idx, torch.zeros_like(idx))
    last_start = torch.cummax(start, dim=1).values
    return idx - last_start


def sample_batch(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    *,
    seed: int,
    step: int,
    eos_id: int | None = None,
    restart_positions: bool = False,
) -> dict[str, torch.Tensor]:
    n = len(tokens)
    if n < seq_len + 2:
        raise DataError(
            f"the corpus has {n} tokens, fewer than one sequence of {seq_len + 1}; "
            "use a shorter --seq-len or more data"
        )
    rng = np.random.default_rng([seed, step])
    offsets = rng.integers(0, n - seq_len - 1, size=batch_size)
    rows = np.stack([np.asarray(tokens[o : o + seq_len + 1], dtype=np.int64) for o in offsets])
    data = torch.from_numpy(rows)
    input_ids, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    if restart_positions and eos_id is not None:
        position_ids = document_positions(input_ids, eos_id)
    else:
        position_ids = torch.arange(seq_len).expand(batch_size, seq_len).contiguous()
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def sequential_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None):
    """Disjoint windows from the start (validation): yields (1, seq_len) input/label pairs."""
    n = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    for i in range(n):
        row = torch.from_numpy(np.asarray(tokens[i * seq_len : (i + 1) * seq_len + 1], dtype=np.int64))
        yield row[None, :-1], row[None, 1:]
