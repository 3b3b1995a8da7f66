"""Activation checkpointing from outside: same loss and gradients, same parameter names, less peak memory;
autocast and compile helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from longctx.config import GPTConfig
from longctx.errors import ConfigError
from longctx.model import GPT
from longctx.train.loss import lm_loss
from longctx.train.memory import (
    apply_activation_checkpointing,
    autocast_context,
    checkpointed_blocks,
    maybe_compile,
    parse_checkpointing,
    remove_activation_checkpointing,
)
from longctx.train.planner import measure_steps
from longctx.train.spec import StepShape


def _batch(config: GPTConfig, B: int = 2, T: int = 48) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (B, T + 1), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(T).expand(B, T)}


def _loss_and_grads(model: GPT, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, batch, chunk_size=32)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("every,save_attention", [(1, True), (1, False), (2, True), ("every:3", True)])
def test_checkpointing_keeps_loss_and_grads(every, save_attention):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", dropout=0.1))  # dropout: the recompute must replay the RNG
    batch = _batch(model.config)
    torch.manual_seed(5)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    names = list(model.state_dict())
    chosen = apply_activation_checkpointing(model, every, save_attention=save_attention)
    assert chosen == checkpointed_blocks(model.config.n_layer, parse_checkpointing(every))
    torch.manual_seed(5)
    loss, grads = _loss_and_grads(model, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=n)
    assert list(model.state_dict()) == names  # checkpoints and LoRA see the same parameter names
    remove_activation_checkpointing(model)
    assert all("forward" not in vars(b) for b in model.blocks)


@pytest.mark.parametrize("mlp_chunk", [7, 16, 48])
def test_tiled_mlp_keeps_loss_and_grads(mlp_chunk):
    """The MLP branch in tiles of `mlp_chunk` tokens (7: tiles that do not divide T) gives the plain
    model's loss and gradients."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"))
    batch = _batch(model.config)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    apply_activation_checkpointing(model, "all", mlp_chunk=mlp_chunk)
    loss, grads = _loss_and_grads(model, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=n)
    with pytest.raises(ConfigError, match="mlp_chunk"):
        apply_activation_checkpointing(model, "all", mlp_chunk=0)


@pytest.mark.parametrize("backend", ["sdpa", "cpu_flash"])
@pytest.mark.parametrize("save_attention,expected", [(True, 0), (False, 4)])
def test_selective_checkpointing_does_not_rerun_attention(save_attention, expected, backend):
    """With save_attention the backward re-runs the projections but not the attention kernel: count the
    kernel's calls during the backward (tiny preset: 4 blocks), torch's or ours (an op of our own)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from longctx.train.memory import _ATTENTION_OPS

    class CountAttention(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if getattr(func, "overloadpacket", None) in _ATTENTION_OPS:
                CountAttention.calls += 1
            return func(*args, **(kwargs or {}))

    from longctx.attention import cpu_flash

    if backend == "cpu_flash" and not cpu_flash.available():
        pytest.skip("no native kernels")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", attn_backend=backend))
    apply_activation_checkpointing(model, "all", save_attention=save_attention)
    with CountAttention():
        loss = lm_loss(model, _batch(model.config), chunk_size=32)
    assert CountAttention.calls == 4  # the forward ran the kernel this test watches, once per block
    CountAttention.calls = 0
    with CountAttention():
        loss.backward()
    assert CountAttention.calls == expected


def test_checkpointed_model_still_generates_with_cache():
    from longctx.infer.cache import KVCache  # noqa: F401 - the cache path must bypass checkpointing

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 260, (1, 12))
    ref = model(ids)
    apply_activation_checkpointing(model, "all")
    torch.testing.assert_close(model(ids), ref)


def test_parse_checkpointing():
    assert [parse_checkpointing(s) for s in ("all", "none", "every:4", 3, None)] == [1, 0, 4, 3, 0]
    assert checkpointed_blocks(8, 3) == [0, 3, 6] and checkpointed_blocks(8, 0) == []
    for bad in ("some", "every:x", "every:", -1):
        with pytest.raises(ConfigError):
            parse_checkpointing(bad)


def test_autocast_context_bf16_and_fp32():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with autocast_context("cpu", "bf16"):
        assert (x @ w).dtype == torch.bfloat16
    with autocast_context("cpu", "fp32"):
        assert (x @ w).dtype == torch.float32
    with pytest.raises(ConfigError, match="precision"):
        with autocast_context("cpu", "fp8"):
            pass


def test_bf16_loss_close_to_fp32():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"))
    batch = _batch(model.config)
    ref = lm_loss(model, batch, 32).item()
    with autocast_context("cpu", "bf16"):
        got = lm_loss(model, batch, 32)
    got.backward()
    assert got.dtype == torch.float32 and abs(got.item() - ref) < 2e-2 * ref
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_maybe_compile_disabled_is_identity():
    model = GPT(GPTConfig.from_preset("tiny"))
    assert maybe_compile(model, False) is model


def test_checkpointing_lowers_peak_rss():
    # 8 tiny blocks at 4096 tokens, so the blocks' activations outweigh the fixed workspaces (attention,
    # loss) and allocator noise; each run in a fresh process, memory taken by the step = peak - after import
    config = GPTConfig.from_preset("tiny", max_seq_len=4096, n_layer=8)
    none, every2, full = measure_steps(
        [StepShape(config, 4096, checkpointing=ck) for ck in ("none", "every:2", "all")], steps=1, threads=1
    )
    assert full["loss"] == pytest.approx(none["loss"], rel=1e-5)
    step = {
        name: r["peak_rss"] - r["base_rss"] for name, r in (("none", none), ("every2", every2), ("all", full))
    }
    assert step["all"] < step["every2"] < step["none"], step


def test_allocator_threshold_and_mallopt():
    """Half an activation, clamped to glibc's range; the mallopt call itself runs in a child process (it
    changes the allocator of the process that makes it)."""
    import subprocess
    import sys

    from longctx.train.memory import allocator_threshold

    assert allocator_threshold(8192, 512) == 8 * 2**20  # 8192 x 512 fp32 = 16 MiB -> 8 MiB
    assert allocator_threshold(16, 64) == 2**20 and allocator_threshold(1 << 20, 4096) == 32 * 2**20
    code = "from longctx.train.memory import limit_allocator_retention as f; print(f(2**20))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("True" if sys.platform.startswith("linux") else "False")


def test_embedding_gradient_kept_matches_torch_and_accumulates():
    """`keep_embedding_gradients`: the embedding's weight gradient (repeated ids summed) equals a float64
    reference of torch's embedding backward, its memory is reused once the .grad is released, and two
    backward passes into a live .grad sum (the kept memory is not written under it)."""
    from longctx.train.memory import keep_embedding_gradients

    torch.manual_seed(0)
    emb = nn.Embedding(50, 8)
    ref = nn.Embedding(50, 8).double()
    ref.weight.data.copy_(emb.weight.data)
    assert keep_embedding_gradients(nn.Sequential(emb)) == 1
    assert keep_embedding_gradients(nn.Sequential(emb)) == 1  # idempotent
    ids = torch.tensor([[3, 7, 3, 49], [0, 3, 7, 7]])  # repeats: rows summed
    up = torch.randn(2, 4, 8)
    emb(ids).mul(up).sum().backward()
    ref(ids).mul(up.double()).sum().backward()
    torch.testing.assert_close(emb.weight.grad.double(), ref.weight.grad, rtol=0, atol=1e-6)
    ptr = emb.weight.grad.data_ptr()
    emb.weight.grad = None
    emb(ids).mul(up).sum().backward()
    assert emb.weight.grad.data_ptr() == ptr  # the kept memory again
    emb(ids[:1]).mul(up[:1]).sum().backward()  # accumulates into the live .grad
    ref(ids[:1]).mul(up[:1].double()).sum().backward()
    torch.testing.assert_close(emb.weight.grad.double(), ref.weight.grad, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight))


@pytest.mark.parametrize("tie", [True, False])
def test_kept_gradients_train_as_fresh_ones(tie):
    """Three bf16 steps of a model prepared for CPU training (the embedding's gradient kept, the loss's
    buffers and the head's gradient kept) against the same model without either: the same gradients each
    step, tied or not, and the same weights after."""
    from longctx.train.loss import LossBuffers
    from longctx.train.memory import keep_embedding_gradients
    from longctx.train.spec import OptimizerSpec, build_optimizer

    torch.manual_seed(0)
    models = [GPT(GPTConfig.from_preset("tiny", tie_embeddings=tie)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    assert keep_embedding_gradients(models[0]) == (0 if tie else 1)
    buffers = [LossBuffers(), None]
    opts = [build_optimizer(m.parameters(), OptimizerSpec(lr=1e-3)) for m in models]
    V, ptrs = models[0].config.vocab_size, []
    for step in range(3):
        ids = torch.randint(0, V, (2, 33), generator=torch.Generator().manual_seed(step))
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
        grads = []
        for model, buf, opt in zip(models, buffers, opts):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lm_loss(model, batch, chunk_size=16, buffers=buf).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            if buf is not None:
                ptrs.append(model.tok_emb.weight.grad.data_ptr())
            opt.step()
            opt.zero_grad(set_to_none=True)
        for name, g in grads[1].items():  # the embedding's rows summed in another order: fp32 rounding
            torch.testing.assert_close(grads[0][name], g, rtol=1e-5, atol=1e-7, msg=name)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if tie:  # autograd adds the loss's and the embedding's gradients into a fresh tensor before the .grad
        # sees either, so neither side keeps one (it would only hold memory)
        assert buffers[0]._gradients == {} and not hasattr(models[0].tok_emb, "_longctx_kept_gradient")
    else:
        assert len(set(ptrs)) == 1  # the kept memory each step


def test_kept_gradient_reads_torchs_storage_count():
    """KeptGradient decides reuse from torch's per-storage holder count (a private API): present in the
    pinned torch, 2 for a tensor alone (it and the temporary storage object), 3 while a view shares it. A
    torch without it makes every gradient fresh: this test says so instead of a silent slowdown."""
    count = torch._C._storage_Use_Count
    t = torch.empty(4)
    assert count(t.untyped_storage()._cdata) == 2
    v = t.view(2, 2)
    assert count(t.untyped_storage()._cdata) == 3
    del v
    assert count(t.untyped_storage()._cdata) == 2
