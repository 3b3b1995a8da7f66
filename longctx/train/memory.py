"""Training-memory tools applied from outside the model: activation checkpointing, bf16 autocast, compile.

Activation checkpointing keeps only each checkpointed block's input in the forward and re-runs the block
in the backward. It is installed by replacing the block's bound `forward` on the instance (not by wrapping
the module), so parameter names, `state_dict` keys and `isinstance` checks stay exactly as in model.py:
checkpoints, LoRA targeting and optimizer groups see the same model. With `save_attention` (the default)
the recomputation keeps the attention kernel's outputs (a few values per token) instead of re-running
attention, the most expensive op per byte saved at long context (selective checkpointing).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from longctx.errors import ConfigError

PRECISIONS = ("fp32", "bf16")

# aten attention kernels whose outputs a selective checkpoint keeps (outputs + logsumexp: O(L) memory)
_ATTENTION_OPS = tuple(
    op
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if (op := getattr(torch.ops.aten, name, None)) is not None
)


def parse_checkpointing(spec: str | int | None) -> int:
    """'all' -> 1, 'none' -> 0, 'every:K' -> K (checkpoint blocks 0, K, 2K, ...); an int passes through."""
    if spec is None:
        return 0
    if isinstance(spec, int) and not isinstance(spec, bool):
        every = spec
    elif isinstance(spec, str) and spec in ("all", "none"):
        every = 1 if spec == "all" else 0
    elif isinstance(spec, str) and spec.startswith("every:") and spec[6:].isdigit():
        every = int(spec[6:])
    else:
        raise ConfigError(
            f"unknown checkpointing {spec!r}; use 'all', 'none' or 'every:K' (K a positive int)"
        )
    if every < 0:
        raise ConfigError(f"checkpointing every {every} blocks: K must be >= 0")
    return every


def checkpointed_blocks(n_layer: int, every: int) -> list[int]:
    """Indices of the blocks `apply_activation_checkpointing(every=...)` checkpoints."""
    return [] if every <= 0 else list(range(0, n_layer, every))


def _save_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed_forward(
    block: nn.Module, save_attention: bool, x, rope, alibi_slopes, cache=None, key_rope=None
):
    # inference (a KV cache, no grad) gains nothing from checkpointing: run the block as is
    if cache is not None or not torch.is_grad_enabled():
        return type(block).forward(block, x, rope, alibi_slopes, cache, key_rope)
    kwargs = {}
    if save_attention and _ATTENTION_OPS:
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _save_attention_policy)
    return checkpoint(
        type(block).forward, block, x, rope, alibi_slopes, None, key_rope, use_reentrant=False, **kwargs
    )


def apply_activation_checkpointing(
    model: nn.Module, every: int | str = 1, save_attention: bool = True
) -> list[int]:
    """Checkpoint blocks 0, every, 2*every, ... of `model.blocks` (every=1: all, 0: none); returns them.

    Idempotent: calling it again first removes earlier checkpointing."""
    every = parse_checkpointing(every)
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError("activation checkpointing needs a model with a `blocks` list (a longctx GPT)")
    remove_activation_checkpointing(model)
    chosen = checkpointed_blocks(len(blocks), every)
    for i in chosen:
        # an instance attribute shadows the class's forward; nn.Module.__call__ then runs it
        blocks[i].forward = functools.partial(_checkpointed_forward, blocks[i], save_attention)
        blocks[i]._longctx_checkpointed = True
    return chosen


def remove_activation_checkpointing(model: nn.Module) -> None:
    for block in getattr(model, "blocks", []):
        if getattr(block, "_longctx_checkpointed", False):
            del block.forward
            del block._longctx_checkpointed


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


@contextlib.contextmanager
def autocast_context(device: str | torch.device, precision: str = "fp32") -> Iterator[None]:
    """bf16: autocast matmuls to bfloat16 (weights and optimizer stay fp32); fp32: nothing."""
    if check_precision(precision) == "fp32":
        yield
        return
    device_type = torch.device(device).type
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        yield


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile each block in place (names, state_dict and `hidden_states` stay as they are).

    Blocks rather than the whole model: the trainer calls `model.hidden_states`, which a compiled
    wrapper's `forward` would not cover, and blocks are identical, so one graph serves them all."""
    if not enabled:
        return model
    for block in getattr(model, "blocks", []):
        block.compile(dynamic=False)
    return model


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Reads VmHWM (the peak of the current address space): unlike
    getrusage's ru_maxrss, Linux does not carry it over from the parent across fork + exec, so a measuring
    subprocess started from a big process (pytest, a trainer) reports its own peak only."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB (macOS: bytes)
