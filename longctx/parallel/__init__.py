"""Beyond one device: data parallel (DDP / FSDP2) and context parallel (ring attention) on torch.distributed.

    setup = parallel.init(dp, cp, device)              # process group + ("dp", "cp") device mesh
    model = setup.wrap_model(model, mode="ddp")        # or "fsdp"; before building the optimizer
    with setup.context(batch) as local:                # zigzag shard + ring attention (cp > 1)
        loss = setup.reduce_loss(lm_loss(model, local), local["labels"])
    loss.backward()
    full = setup.gather_model(model)                   # rank 0: whole model for save_checkpoint

The model file does not change: parallelism wraps it from outside, as torchtitan does.
"""

from longctx.parallel.context import reduce_loss, shard_batch, zigzag_indices
from longctx.parallel.data_parallel import DP_MODES, ParallelModel
from longctx.parallel.mesh import ParallelSetup, init
from longctx.parallel.ring import RingLayout, ring_attention

__all__ = [
    "DP_MODES",
    "ParallelModel",
    "ParallelSetup",
    "RingLayout",
    "init",
    "reduce_loss",
    "ring_attention",
    "shard_batch",
    "zigzag_indices",
]
