"""`init(dp, cp, device)`: the process group and a ("dp", "cp") device mesh, and the one object the trainer
talks to (`ParallelSetup`).

Launch with torchrun, which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT:
    torchrun --nproc-per-node 4 -m longctx train --preset tiny --seq-len 1024 --dp 2 --cp 2
Rank r sits at mesh coordinate (r // cp, r % cp): the C ranks of a context-parallel group are neighbours,
so on a multi-GPU node the ring's point-to-point traffic stays on the fastest links. Backend: nccl on CUDA,
gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from longctx.device import resolve_device
from longctx.errors import ConfigError
from longctx.parallel import context as cp_context
from longctx.parallel import data_parallel, gather


@dataclass
class ParallelSetup:
    """This rank's place in the dp x cp grid, and the helpers a training step needs."""

    dp: int = 1
    cp: int = 1
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: DeviceMesh | None = None
    owns_process_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return self.mesh["cp"].get_group() if self.mesh is not None and self.cp > 1 else None

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.mesh["dp"].get_group() if self.mesh is not None and self.dp > 1 else None

    @property
    def cp_ranks(self) -> tuple[int, ...]:
        start = self.dp_rank * self.cp
        return tuple(range(start, start + self.cp))

    # -- model ---------------------------------------------------------------------------------------
    def wrap_model(self, model: nn.Module, mode: str = "ddp") -> nn.Module:
        """DDP or FSDP2 over all dp*cp ranks (gradients averaged over all of them); the model itself if
        running on one process. Wrap before building the optimizer (FSDP replaces the parameters)."""
        if mode not in data_parallel.DP_MODES:
            raise ConfigError(
                f"unknown --dp-mode {mode!r}; choose one of {', '.join(data_parallel.DP_MODES)}"
            )
        self.check_model(model)
        if not self.enabled:
            return model
        if mode == "fsdp":
            world = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("dp_cp",))
            return data_parallel.wrap_fsdp(model, world)
        return data_parallel.wrap_ddp(model, self.device)

    def check_model(self, model: nn.Module) -> None:
        """Refuse what the ring cannot do exactly, before any step runs."""
        if self.cp == 1:
            return
        positions = getattr(model, "positions", None)
        if positions is not None and positions.length_dependent:
            raise ConfigError(
                f"rope_type {model.config.rope_type!r} picks its frequencies from the sequence "
                "length, which each context-parallel rank would see differently; use a static "
                "scaling (e.g. linear or yarn) or --cp 1"
            )
        if getattr(model.config, "dropout", 0.0) > 0:
            raise ConfigError("context parallel needs dropout=0 (ring attention has no attention dropout)")

    @contextlib.contextmanager
    def context(self, batch: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """`with setup.context(batch) as local:` this rank's zigzag shard, ring attention installed."""
        with cp_context.context_parallel(
            batch, cp=self.cp, cp_rank=self.cp_rank, group=self.cp_group, ranks=self.cp_ranks
        ) as local:
            yield local

    def reduce_loss(self, loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Local mean loss -> the group's mean (value) with the exact gradient; see context.reduce_loss."""
        return cp_context.reduce_loss(loss, labels, cp=self.cp, group=self.cp_group)

    def no_sync(self, model: nn.Module, last_micro_batch: bool):
        """Gradient accumulation: reduce gradients only on the last micro-batch of a step."""
        if last_micro_batch or not isinstance(
            model, (data_parallel.ParallelModel, data_parallel.ParallelModule)
        ):
            return contextlib.nullcontext()
        return model.no_sync()

    # -- data ----------------------------------------------------------------------------------------
    def batch_index(self, step: int, micro: int, grad_accum: int) -> int:
        """Which micro-batch this rank draws: data-parallel ranks draw different ones, the cp ranks of a
        group the same one (then split it). With dp=1 it is step*grad_accum + micro, the one-process
        index, so dp=D with grad_accum=A sees exactly the batches of one process with grad_accum=D*A."""
        return (step * grad_accum + micro) * self.dp + self.dp_rank

    def mean_over_dp(self, value: float) -> float:
        """Average a logged number over the data-parallel ranks (the cp ranks already agree)."""
        if self.dp == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, group=self.dp_group)
        return float(t) / self.dp

    # -- checkpoints ---------------------------------------------------------------------------------
    def gather_model(self, model: nn.Module) -> nn.Module | None:
        """The whole model on rank 0 (None elsewhere), ready for `save_checkpoint`. Collective."""
        return gather.gather_model(model, self.is_main)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        return gather.optimizer_state(model, optimizer)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state) -> None:
        gather.load_optimizer_state(model, optimizer, state)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def init(dp: int = 1, cp: int = 1, device: str | torch.device = "auto") -> ParallelSetup:
    """Join (or start) the process group torchrun describes and build the (dp, cp) mesh."""
    if dp < 1 or cp < 1:
        raise ConfigError(f"--dp and --cp must be >= 1, got --dp {dp} --cp {cp}")
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world != dp * cp:
        raise ConfigError(
            f"--dp {dp} x --cp {cp} needs {dp * cp} processes but {world} were started; launch "
            f"with `torchrun --nproc-per-node {dp * cp} -m longctx ...` (or fix --dp/--cp)"
        )
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return ParallelSetup(device=dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    mesh = init_device_mesh(dev.type, (dp, cp), mesh_dim_names=("dp", "cp"))
    return ParallelSetup(
        dp=dp, cp=cp, rank=dist.get_rank(), world_size=world, device=dev, mesh=mesh, owns_process_group=owns
    )
