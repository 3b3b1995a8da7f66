"""Context parallelism as a context around the training step (torchtitan's shape): shard the batch along the
sequence with the zigzag split, run the model with the ring attention backend, reduce the loss over the group.

Zigzag (load-balanced causal) split: the T tokens are cut into 2C equal chunks and rank r keeps chunks r and
2C-1-r. Under a causal mask a late chunk attends to many keys and an early one to few; pairing them gives
every rank the same amount of attention work. input_ids, position_ids and labels are sharded alike, so RoPE,
absolute positions and the loss see each token's true position and target.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from longctx.errors import ConfigError
from longctx.parallel.ring import RingLayout, ring_backend

SEQUENCE_KEYS = ("input_ids", "position_ids", "labels", "attention_mask", "loss_mask")


def zigzag_indices(seq_len: int, cp: int, cp_rank: int, device: torch.device | None = None) -> torch.Tensor:
    """Global token indices rank `cp_rank` keeps: (seq_len / cp,), chunks cp_rank and 2*cp-1-cp_rank."""
    if seq_len % (2 * cp):
        raise ConfigError(
            f"context parallel with --cp {cp} splits each sequence into 2*cp = {2 * cp} equal "
            f"chunks, but the sequence length is {seq_len}; use a multiple of {2 * cp} "
            f"(e.g. {(seq_len // (2 * cp) + 1) * 2 * cp})"
        )
    n = seq_len // (2 * cp)
    first = torch.arange(cp_rank * n, (cp_rank + 1) * n, device=device)
    second = torch.arange((2 * cp - 1 - cp_rank) * n, (2 * cp - cp_rank) * n, device=device)
    return torch.cat([first, second])


def shard_batch(batch: dict[str, torch.Tensor], cp: int, cp_rank: int) -> dict[str, torch.Tensor]:
    """Zigzag-shard every (B, T) sequence tensor of `batch` along T; other entries pass through."""
    if "input_ids" not in batch:
        raise ConfigError("a context-parallel batch needs 'input_ids' (B, T)")
    B, T = batch["input_ids"].shape
    idx = zigzag_indices(T, cp, cp_rank, batch["input_ids"].device)
    out = dict(batch)
    if out.get("position_ids") is None:
        # positions must be explicit: after the split a rank's tokens are no longer 0..T/C-1
        out["position_ids"] = torch.arange(T, device=idx.device).expand(B, T)
    for key in SEQUENCE_KEYS:
        t = out.get(key)
        if t is not None and t.dim() >= 2 and t.shape[1] == T:
            out[key] = t.index_select(1, idx).contiguous()
    return out


@contextlib.contextmanager
def context_parallel(
    batch: dict[str, torch.Tensor],
    *,
    cp: int,
    cp_rank: int,
    group: dist.ProcessGroup | None,
    ranks: tuple[int, ...],
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this rank's shard of `batch`, carrying the ring attention backend for the model's forward
    (`batch["attention"]`, read by `lm_loss`), when cp > 1; else the batch unchanged."""
    if cp == 1:
        yield batch
        return
    local = shard_batch(batch, cp, cp_rank)
    T = batch["input_ids"].shape[1]
    layout = RingLayout(group=group, ranks=ranks, index=cp_rank, chunk=T // (2 * cp))
    local["attention"] = ring_backend(layout)
    yield local


def reduce_loss(
    loss: torch.Tensor,
    labels: torch.Tensor,
    *,
    cp: int,
    group: dist.ProcessGroup | None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The context-parallel group's loss from each rank's local mean.

    loss: mean over this rank's non-ignored labels (what `lm_loss` returns on the local shard).
    Returns a tensor whose *value* is the group's mean, sum(nll) / sum(count) over all C ranks (the number
    the single-process run reports), and whose *gradient* is that of C * local_sum / global_count. The
    factor C is there because the data-parallel wrapper (DDP or FSDP over all D*C ranks) averages gradients
    over the C ranks of a group that share one sequence, where the exact gradient is their sum."""
    if cp == 1:
        return loss
    count = (labels != ignore_index).sum().to(loss.dtype)
    stats = torch.stack([loss.detach() * count, count])
    dist.all_reduce(stats, group=group)
    total_count = stats[1].clamp_min(1)
    for_grad = loss * count * cp / total_count
    value = stats[0] / total_count
    return for_grad + (value - for_grad).detach()
