"""Training-memory tools applied from outside the model: activation checkpointing, bf16 autocast, compile.

Activation checkpointing frees a block's activations after its forward and recomputes them in the
backward. It wraps the block's two residual branches separately (`Block.attn_branch`, `Block.mlp_branch`):

- the attention branch (norm, q/k/v projections, RoPE, attention, output projection) is one checkpoint
  that keeps its input and, with `save_attention` (the default), the attention kernel's outputs (its
  output and logsumexp: O(L) values) so the backward re-runs the cheap projections but not attention —
  the most expensive op per byte kept at long context (selective checkpointing);
- the MLP branch is token-wise, so it is checkpointed in tiles of `mlp_chunk` tokens (the TiledMLP of
  Arctic Long Sequence Training): its backward re-materialises one tile at a time, never the
  (tokens x d_ff) intermediates of the whole sequence, the largest tensors of a block.

Between them the block keeps three vectors per token (input, attention output, MLP input) instead of its
~16 d + 6 d_ff floats, and the recomputation costs one forward of the block, as plain checkpointing does.
The wrapper is installed by replacing the block's bound `forward` on the instance (not by wrapping the
module), so parameter names, `state_dict` keys and `isinstance` checks stay exactly as in model.py:
checkpoints, LoRA targeting and optimizer groups see the same model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import longctx.attention.cpu_flash  # noqa: F401  (registers torch.ops.longctx.flash_attention_*)
from longctx.device import peak_rss_bytes  # noqa: F401  (the planner's and benches' import)
from longctx.errors import ConfigError
from longctx.train.spec import PRECISIONS, StepShape

# attention kernels whose outputs a selective checkpoint keeps (outputs + logsumexp: O(L) memory): torch's
# and ours (longctx.attention.cpu_flash)
_ATTENTION_OPS = tuple(
    op
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if (op := getattr(torch.ops.aten, name, None)) is not None
) + (torch.ops.longctx.flash_attention_cpu, torch.ops.longctx.flash_attention_bf16)


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


# tokens per MLP tile (a tile's recomputed intermediates: a few d_ff floats per token)
DEFAULT_MLP_CHUNK = 2048


def mlp_tile_tokens(chunk: int, device_type: str) -> int:
    """Tokens per MLP tile on this device: 4x longer on a GPU, where per-tile launch overhead costs more
    than the memory saves."""
    return chunk if device_type == "cpu" else 4 * chunk


def _save_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # ops arrive as overloads (aten.x.default); the list holds their packets
    packet = getattr(op, "overloadpacket", op)
    return CheckpointPolicy.MUST_SAVE if packet in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _tiled_mlp(block: nn.Module, x: torch.Tensor, chunk: int, preserve_rng_state: bool) -> torch.Tensor:
    """block.mlp_branch(x) over tiles (dim -2), each a checkpoint: (B, T, d) -> (B, T, d)."""
    chunk = mlp_tile_tokens(chunk, x.device.type)
    tiles = [
        checkpoint(
            block.mlp_branch,
            x[..., s : s + chunk, :],
            use_reentrant=False,
            preserve_rng_state=preserve_rng_state,
        )
        for s in range(0, x.shape[-2], chunk)
    ]
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-2)


def _checkpointed_forward(block: nn.Module, save_attention: bool, mlp_chunk: int, x, ctx):
    # inference (a KV cache, no grad) gains nothing from checkpointing: run the block as is
    if ctx.cache is not None or not torch.is_grad_enabled():
        return type(block).forward(block, x, ctx)
    # replaying dropout needs the RNG state saved and restored around each recomputation; skip that work
    # when there is no dropout
    kwargs = {"use_reentrant": False, "preserve_rng_state": block.attn.config.dropout > 0}
    if save_attention and _ATTENTION_OPS:
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _save_attention_policy)
    x = x + checkpoint(block.attn_branch, x, ctx, **kwargs)
    return x + _tiled_mlp(block, x, mlp_chunk, kwargs["preserve_rng_state"])


def apply_activation_checkpointing(
    model: nn.Module, every: int | str = 1, save_attention: bool = True, mlp_chunk: int = DEFAULT_MLP_CHUNK
) -> list[int]:
    """Checkpoint blocks 0, every, 2*every, ... of `model.blocks` (every=1: all, 0: none); returns them.

    Idempotent: calling it again first removes earlier checkpointing."""
    every = parse_checkpointing(every)
    if mlp_chunk <= 0:
        raise ConfigError(f"mlp_chunk must be a positive number of tokens, got {mlp_chunk}")
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError("activation checkpointing needs a model with a `blocks` list (a longctx GPT)")
    remove_activation_checkpointing(model)
    chosen = checkpointed_blocks(len(blocks), every)
    for i in chosen:
        # an instance attribute shadows the class's forward; nn.Module.__call__ then runs it
        blocks[i].forward = functools.partial(_checkpointed_forward, blocks[i], save_attention, mlp_chunk)
        blocks[i]._longctx_checkpointed = True
    return chosen


def prepare_for_training(model: nn.Module, shape: StepShape) -> list[int]:
    """What the memory side of `shape` asks of the model, applied from outside: activation checkpointing of
    the chosen blocks; on CPU the embeddings' gradients kept across steps (`keep_embedding_gradients`) and,
    with checkpointing, glibc told to return freed activations at once (a lower, predictable peak RSS:
    `limit_allocator_retention`). Returns the checkpointed blocks."""
    chosen = apply_activation_checkpointing(model, shape.checkpointing)
    if shape.device == "cpu":
        keep_embedding_gradients(model)
        if chosen:
            limit_allocator_retention(allocator_threshold(shape.tokens, shape.config.d_model))
    return chosen


class KeptGradient:
    """A parameter's gradient tensor kept from one training step to the next, for the CPU, where a fresh
    vocabulary-sized gradient each step is page-faulted in and unmapped again (for `base` 65 MB, ~20 ms of
    faults a step in a 2-core VM on AMD EPYC Zen 5, against ~1 ms to refill a kept one). Autograd makes the
    tensor handed out the .grad as it is (a view of the kept one); `get` hands the kept memory out again
    only once no tensor outside this object shares it (the trainer released last step's .grad), else a
    fresh tensor, kept in its place: a .grad still alive -- micro-batches accumulating into it, a caller
    holding an old one -- is never written. A tied embedding and head (one parameter, two gradients) would
    gain nothing: autograd adds the two into a fresh tensor before the .grad sees either, so neither keeps
    one there (`keep_embedding_gradients`, `LossBuffers.scratch_only`)."""

    def __init__(self) -> None:
        self._kept: torch.Tensor | None = None

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised (shape) tensor."""
        t = self._kept
        if t is None or t.shape != shape or t.dtype != dtype or t.device != device or _shared(t):
            t = self._kept = torch.empty(shape, dtype=dtype, device=device)
        return t.view(shape)


def _shared(t: torch.Tensor) -> bool:
    """Whether a tensor besides `t` holds its memory. torch counts the holders of each storage: `t` and the
    temporary storage object read here are two. Without that count (a private API) every tensor counts as
    shared, so gradients are allocated afresh, as torch's own backward does."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count is None or count(t.untyped_storage()._cdata) > 2


class _EmbeddingKeptGradient(torch.autograd.Function):
    """F.embedding whose weight gradient (V, d) is summed into a `KeptGradient` instead of a fresh zero
    tensor (torch's embedding backward: a zero fill of the whole table, then the rows added)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, kept: KeptGradient) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.kept, ctx.weight_shape, ctx.weight_dtype = kept, weight.shape, weight.dtype
        return F.embedding(ids, weight)  # (..., d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        dw = ctx.kept.get(ctx.weight_shape, ctx.weight_dtype, grad.device).zero_()
        dw.index_add_(0, ids.reshape(-1), grad.reshape(-1, dw.shape[1]).to(dw.dtype))
        return dw, None, None


def _embedding_forward(emb: nn.Embedding, kept: KeptGradient, ids: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and emb.weight.requires_grad and emb.weight.device.type == "cpu":
        return _EmbeddingKeptGradient.apply(emb.weight, ids, kept)
    return F.embedding(ids, emb.weight)


def keep_embedding_gradients(model: nn.Module) -> int:
    """CPU training: every plain nn.Embedding of `model` (no padding index, max norm or sparse gradient; not
    the model's tied head) forms its weight gradient in a `KeptGradient`. Installed on the instance's
    forward, as checkpointing is: parameters, state_dict and isinstance checks stay model.py's. Idempotent;
    returns how many."""
    count, head = 0, getattr(model, "head_weight", None)
    for module in model.modules():
        plain = (
            type(module) is nn.Embedding
            and module.weight is not head  # tied to the head: see KeptGradient
            and module.padding_idx is None
            and module.max_norm is None
            and not module.sparse
            and not module.scale_grad_by_freq
        )
        if plain:
            if not getattr(module, "_longctx_kept_gradient", False):
                module.forward = functools.partial(_embedding_forward, module, KeptGradient())
                module._longctx_kept_gradient = True
            count += 1
    return count


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


def allocator_threshold(tokens: int, d_model: int) -> int:
    """The mmap threshold for `limit_allocator_retention`: half an activation (tokens x d_model fp32), so
    every activation-sized tensor is mmapped, within glibc's limits [1 MiB, 32 MiB]."""
    return max(1 << 20, min(32 << 20, tokens * d_model * 4 // 2))


def limit_allocator_retention(threshold: int) -> bool:
    """Make glibc's malloc serve blocks of `threshold` bytes and more with mmap, so freed activations go back
    to the OS at once (CPU training with checkpointing). Returns whether it applied.

    By default glibc raises its mmap threshold whenever a large block is freed (up to 32 MiB) and then
    serves activation-sized tensors from its heap, where freed holes stay resident: on `base` at 8192
    tokens, checkpointed, the peak RSS measured 2.9 GB by default and 2.2 GB with the threshold at half an
    activation (8 MiB), for ~3-5% of the step time (fresh blocks are page-faulted in); 128 KiB gave 1.8 GB
    (the tensors alive at the peak) but cost ~12%. Fixing the threshold also stops glibc's dynamic
    adjustment for the rest of the process."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other libcs: leave the allocator alone
        return False
    M_MMAP_THRESHOLD = -3
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
