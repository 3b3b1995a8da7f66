"""Checkpoints from N ranks are ordinary single-file checkpoints: gather the full state on rank 0, save it
with `longctx.checkpoint.save_checkpoint`. They then load on 1 rank (`load_model`) or on N ranks (every
rank loads the file, then wraps; DDP broadcasts rank 0's copy, FSDP shards it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from longctx.errors import ConfigError
from longctx.model import GPT
from longctx.parallel.data_parallel import ParallelModel, ParallelModule

_TRUNK_PREFIX = "gpt."  # parameter names inside data_parallel._Trunk


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_model(model: nn.Module, is_main: bool) -> nn.Module | None:
    """A whole, unwrapped model with CPU weights on rank 0 (None elsewhere). Collective: call on every rank."""
    if isinstance(model, ParallelModule):
        return model.gpt if is_main else None
    if not isinstance(model, ParallelModel):
        return model if is_main else None
    if model.mode == "ddp":  # every rank already holds the whole model
        return model.gpt if is_main else None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    # FSDP: every rank must join the all-gather; with cpu_offload only rank 0 receives the tensors
    state = get_model_state_dict(model.wrapped, options=_full_options())
    if not is_main:
        return None
    if not isinstance(model.gpt, GPT):
        raise ConfigError(
            "FSDP checkpoints are gathered into a plain GPT; use --dp-mode ddp for other models"
        )
    # built on CPU (not meta) so non-persistent buffers such as RoPE's inverse frequencies exist too
    full = GPT(model.gpt.config)
    full.load_state_dict({k.removeprefix(_TRUNK_PREFIX): v for k, v in state.items()})
    return full


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state to save. DDP: the plain state dict (same layout as a one-rank run, so it resumes
    on any number of ranks). FSDP: the full state keyed by parameter name (resumes under FSDP)."""
    if isinstance(model, ParallelModel) and model.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model.wrapped, optimizer, options=_full_options())
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if isinstance(model, ParallelModel) and model.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model.wrapped, optimizer, state, options=_full_options())
        return
    optimizer.load_state_dict(state)
