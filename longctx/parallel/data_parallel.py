"""Data parallelism around an unchanged GPT: DDP or FSDP2 (`fully_shard`), over all D*C ranks.

Both wrappers act on a module's `__call__` (DDP prepares its gradient reduction there, FSDP gathers the
parameters in its forward hooks), but the loss calls `model.hidden_states(...)` and `model.head_weight`, not
`model(...)`. So the GPT is wrapped inside a small `_Trunk` whose forward *is* `hidden_states`, and
`ParallelModel` gives the trainer back the two things `lm_loss` uses.

Trade-off:
- `ddp`: every rank keeps the whole model, gradients and optimizer state; one all-reduce of the gradients
  per step, overlapped with the backward. Fastest when the model fits one device.
- `fsdp`: parameters, gradients and optimizer state are sharded over the D*C ranks (ZeRO-3); each block's
  weights are all-gathered just before use and freed after, gradients reduce-scattered. ~1/(D*C) of the
  model state per rank at the price of ~1.5x the communication. Use it when the model does not fit.
Gradients are averaged over all D*C ranks in both; `reduce_loss` scales the context-parallel loss by C so
the average over a group that shares one sequence becomes the exact sum.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from longctx.errors import ConfigError
from longctx.model import GPT

DP_MODES = ("ddp", "fsdp")


class _Trunk(nn.Module):
    """What DDP/FSDP wrap: forward = GPT.hidden_states, so every training call passes through their hooks."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids, position_ids=None, key_mask=None, attention=None) -> torch.Tensor:
        return self.gpt.hidden_states(input_ids, position_ids, key_mask=key_mask, attention=attention)


class ParallelModel(nn.Module):
    """The training view of a wrapped GPT: `hidden_states` (through the wrapper), `head_weight`, `logits`."""

    def __init__(self, wrapped: nn.Module, gpt: GPT, mode: str):
        super().__init__()
        self.wrapped, self.mode = wrapped, mode
        object.__setattr__(self, "gpt", gpt)  # a plain reference: its parameters belong to `wrapped`

    @property
    def config(self):
        return self.gpt.config

    @property
    def head_weight(self) -> torch.Tensor:
        # FSDP: the root (`_Trunk`) is not resharded after forward, so this is the full weight here
        return self.gpt.head_weight

    def hidden_states(
        self, input_ids: torch.Tensor, position_ids=None, cache=None, key_mask=None, attention=None
    ) -> torch.Tensor:
        if cache is not None:
            raise ConfigError(
                "a data/context-parallel training model has no KV cache; generate with the "
                "saved checkpoint instead"
            )
        return self.wrapped(input_ids, position_ids, key_mask, attention)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.gpt.logits(self.hidden_states(input_ids, position_ids))  # (B, T, V)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip the gradient reduction (all but the last micro-batch of a gradient-accumulation step)."""
        if self.mode == "ddp":
            with self.wrapped.no_sync():
                yield
            return
        self.wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.wrapped.set_requires_gradient_sync(True)


class ParallelModule(nn.Module):
    """A task model (a classification head on a GPT) under DDP: its own `forward` is what the objective
    calls, so DDP wraps it directly."""

    mode = "ddp"

    def __init__(self, wrapped: nn.Module, module: nn.Module):
        super().__init__()
        self.wrapped = wrapped
        object.__setattr__(self, "gpt", module)  # what checkpoints gather: the task model itself

    def forward(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def no_sync(self):
        return self.wrapped.no_sync()


def wrap_ddp(gpt: nn.Module, device: torch.device) -> ParallelModel | ParallelModule:
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(gpt, GPT):  # a task model: DDP over its own forward
        ids = [device.index] if device.type == "cuda" else None
        return ParallelModule(DistributedDataParallel(gpt, device_ids=ids, forward_sync_buffers=False), gpt)

    # buffers (RoPE frequencies) are computed identically on every rank: no per-step broadcast needed
    ddp = DistributedDataParallel(
        _Trunk(gpt), device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
    )
    return ParallelModel(ddp, gpt, "ddp")


def wrap_fsdp(gpt: GPT, mesh: DeviceMesh) -> ParallelModel:
    from torch.distributed.fsdp import fully_shard

    if not isinstance(gpt, GPT):
        raise ConfigError("--dp-mode fsdp shards a GPT; fine-tune a task model with --dp-mode ddp")

    # one FSDP unit per block (gathered just in time), then the root for embeddings/norm/head; the root
    # keeps its weights after forward because the loss reads the head weight right after (torchtitan order)
    for block in gpt.blocks:
        fully_shard(block, mesh=mesh)
    trunk = fully_shard(_Trunk(gpt), mesh=mesh, reshard_after_forward=False)
    return ParallelModel(trunk, gpt, "fsdp")
