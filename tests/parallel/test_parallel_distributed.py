"""Data and context parallel on CPU (gloo), in 2 and 4 processes spawned here, against one-process runs.

Spawning is slow (each process imports torch), so each spawn runs many checks: every rank builds the
single-process reference itself (same seed, the full batch, the plain sdpa attention) and compares.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx import parallel
from longctx.checkpoint import load_model, save_checkpoint
from longctx.config import GPTConfig
from longctx.errors import ConfigError
from longctx.model import GPT
from longctx.positions.rope import ROPE_INIT_FUNCTIONS
from longctx.train.loss import lm_loss

T, B = 64, 2
RTOL = 1e-5  # fp32, one forward/backward
# Training is compared in float64: AdamW divides by sqrt(v), which turns the fp32 round-off of a different
# (legitimate) summation order into ~1e-5 parameter differences after a few steps on near-zero gradients.
# In float64 both runs must agree to round-off, a far stricter check of the same algorithm.
TRAIN_DTYPE, TRAIN_RTOL = torch.float64, 1e-10
YARN = (
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    if "yarn" in ROPE_INIT_FUNCTIONS
    else {"rope_type": "linear", "factor": 4.0}
)
CONFIGS = {
    "rope": {},
    "rope-yarn": {"rope_scaling": YARN},
    "alibi-gqa": {"position": "alibi", "n_kv_head": 2},
}


def _config(name: str) -> GPTConfig:
    return GPTConfig.from_preset("tiny", **CONFIGS[name])


def _batch(index: int, seq_len: int = T, vocab: int = 260) -> dict[str, torch.Tensor]:
    """Batch number `index`: random tokens, a few ignored labels so ranks hold unequal label counts."""
    g = torch.Generator().manual_seed(1000 + index)
    ids = torch.randint(0, vocab, (B, seq_len + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[:, :5] = -100  # all in rank 0's first chunk: the normalisation must use the global count
    return {
        "input_ids": ids[:, :-1].contiguous(),
        "labels": labels,
        "position_ids": torch.arange(seq_len).expand(B, seq_len).contiguous(),
    }


def _model(config: GPTConfig, dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(0)
    return GPT(config.replace(attn_backend="sdpa")).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# -- checks run inside the workers -----------------------------------------------------------------------
def check_cp_gradients(setup: parallel.ParallelSetup, name: str) -> None:
    """One forward/backward with context parallel: the group's loss and every gradient equal one process's."""
    batch = _batch(setup.dp_rank)
    ref = _model(_config(name))
    ref_loss = lm_loss(ref, batch, None)
    ref_loss.backward()

    gpt = _model(_config(name))
    model = setup.wrap_model(gpt, "ddp")
    with setup.context(batch) as local:
        assert local["input_ids"].shape == (B, T // setup.cp)
        loss = setup.reduce_loss(lm_loss(model, local), local["labels"])
    loss.backward()
    # the DDP average over the dp ranks mixes batches of different dp ranks: compare only at dp=1
    assert abs(float(loss.detach()) - float(ref_loss)) <= RTOL * abs(float(ref_loss)), (
        name,
        float(loss),
        float(ref_loss),
    )
    if setup.dp == 1:
        for (n, p), q in zip(gpt.named_parameters(), ref.parameters()):
            assert _rel(p.grad, q.grad) <= RTOL, (name, n, _rel(p.grad, q.grad))


def check_bad_length(setup: parallel.ParallelSetup) -> None:
    bad = 2 * setup.cp * 8 + 2
    with pytest.raises(ConfigError, match=rf"length is {bad}.*multiple of {2 * setup.cp}"):
        with setup.context(_batch(0, seq_len=bad)):
            pass


def _train(model: torch.nn.Module, params, batches, steps: int, accum: int, setup=None) -> None:
    """`steps` AdamW steps of `accum` micro-batches each; batches(step, micro) -> the full batch."""
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        for micro in range(accum):
            batch = batches(step, micro)
            if setup is None:
                loss = lm_loss(model, batch, None) / accum
            else:
                with setup.no_sync(model, micro == accum - 1), setup.context(batch) as local:
                    loss = setup.reduce_loss(lm_loss(model, local), local["labels"]) / accum
                    loss.backward()
                continue
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def check_training(setup: parallel.ParallelSetup, mode: str, accum: int = 1) -> tuple[torch.nn.Module, GPT]:
    """3 steps on dp ranks x accum micro-batches == 3 steps of one process accumulating dp*accum."""
    config = _config("rope")
    ref = _model(config, TRAIN_DTYPE)
    _train(ref, ref.parameters(), lambda s, m: _batch(s * setup.dp * accum + m), 3, setup.dp * accum)

    gpt = _model(config, TRAIN_DTYPE)
    model = setup.wrap_model(gpt, mode)
    _train(model, gpt.parameters(), lambda s, m: _batch(setup.batch_index(s, m, accum)), 3, accum, setup)
    for (n, p), q in zip(gpt.named_parameters(), ref.parameters()):
        assert _rel(_full(p.detach()), q.detach()) <= TRAIN_RTOL, (
            mode,
            n,
            _rel(_full(p.detach()), q.detach()),
        )
    return model, ref


def check_checkpoint(setup: parallel.ParallelSetup, tmp: Path, mode: str) -> None:
    """Save from N ranks, load on 1 (and on N): the logits are those of the one-process model."""
    model, ref = check_training(setup, mode)
    ids = _batch(99)["input_ids"]
    with torch.no_grad():
        want = ref.float()(ids)  # checkpoints load as fp32: compare with the reference rounded alike
    path = tmp / f"ckpt-{mode}"
    full = setup.gather_model(model)
    if setup.is_main:
        save_checkpoint(path, full)
        with torch.no_grad():
            got = load_model(path)(ids)  # one rank, no process group involved
        assert _rel(got, want) <= RTOL, (mode, _rel(got, want))
    setup.barrier()
    # ... and back onto N ranks: every rank loads the file and wraps it
    reloaded = setup.wrap_model(load_model(path).train(), mode)
    with torch.no_grad():
        got = reloaded(ids)
    assert _rel(got, want) <= RTOL, (mode, "reloaded on N ranks", _rel(got, want))


def check_task_ddp(setup: parallel.ParallelSetup) -> None:
    """A classification model (GPT + head, the fine-tune's module) under DDP through the one Trainer: 3
    steps on dp ranks == 3 steps of one process on all ranks' batches (accumulated)."""
    from longctx.tasks.heads import ClassificationModel
    from longctx.train.schedules import lr_at
    from longctx.train.spec import LoopSpec, OptimizerSpec, StepShape, build_optimizer
    from longctx.train.trainer import Trainer

    class Batches:
        def train(self, step, index):
            g = torch.Generator().manual_seed(index)
            return {
                "input_ids": torch.randint(0, 260, (2, 16), generator=g),
                "lengths": torch.tensor([16, 9]),
                "labels": torch.randint(0, 3, (2,), generator=g),
            }

        def validation(self, step):
            return []

    class Loss:
        def loss(self, model, batch):
            return torch.nn.functional.cross_entropy(
                model(batch["input_ids"], batch["lengths"]), batch["labels"]
            )

    class NoCheckpoint:
        out = Path(os.environ["LONGCTX_TEST_TMP"]) / f"task-{setup.rank}"

        def save(self, *a, **kw):
            pass

        def restore(self, model):
            return None

    def task_model():
        torch.manual_seed(0)
        return ClassificationModel(_model(_config("rope"), TRAIN_DTYPE), 3).to(TRAIN_DTYPE)

    optim = OptimizerSpec(lr=1e-2, warmup=0, grad_clip=0)
    shape = StepShape(_config("rope"), 16, 2)
    ref = task_model()  # one process: all ranks' batches accumulated, the trainer's LR schedule
    opt = build_optimizer(ref.parameters(), optim)
    for step in range(3):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=optim.lr, warmup=0, total=3, min_ratio=optim.min_lr_ratio)
        for micro in range(setup.dp):
            (Loss().loss(ref, Batches().train(step, step * setup.dp + micro)) / setup.dp).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model = task_model()
    loop = LoopSpec(steps=3, quiet=True, dp=setup.dp, device="cpu")
    Trainer(model, Loss(), Batches(), shape, optim, loop, NoCheckpoint()).run()  # joins this process group
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert _rel(p.detach(), q.detach()) <= TRAIN_RTOL, (n, _rel(p.detach(), q.detach()))


# -- process plumbing --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, scenario: str, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LONGCTX_TEST_TMP=tmp,
    )
    torch.set_num_threads(1)  # 2-4 processes share 2 cores
    dist.init_process_group("gloo")
    try:
        SCENARIOS[scenario](Path(tmp))
    finally:
        dist.destroy_process_group()


def _two_ranks(tmp: Path) -> None:
    cp2 = parallel.init(dp=1, cp=2, device="cpu")
    for name in CONFIGS:
        check_cp_gradients(cp2, name)
    check_bad_length(cp2)
    dp2 = parallel.init(dp=2, cp=1, device="cpu")
    check_training(dp2, "ddp", accum=2)  # grad accumulation with no_sync on top of dp
    check_task_ddp(dp2)
    check_checkpoint(dp2, tmp, "ddp")
    check_checkpoint(dp2, tmp, "fsdp")


def _four_ranks(tmp: Path) -> None:
    cp4 = parallel.init(dp=1, cp=4, device="cpu")
    for name in CONFIGS:
        check_cp_gradients(cp4, name)
    check_bad_length(cp4)
    grid = parallel.init(dp=2, cp=2, device="cpu")
    check_cp_gradients(grid, "rope")
    check_training(grid, "ddp")
    check_training(grid, "fsdp")


SCENARIOS = {"two": _two_ranks, "four": _four_ranks}


def _spawn(world: int, scenario: str, tmp: Path) -> None:
    mp.spawn(_worker, args=(world, _free_port(), scenario, str(tmp)), nprocs=world, join=True)


def test_two_ranks_cp2_dp2_checkpoint(tmp_path):
    _spawn(2, "two", tmp_path)


def test_four_ranks_cp4_and_dp2_x_cp2(tmp_path):
    _spawn(4, "four", tmp_path)
