"""The same model on a CUDA device: outputs, gradients, checkpointing, the chunked loss and cached
generation agree with the CPU reference. Marked `gpu` (out of the default run); `bench/gpu.sh` runs them."""

from __future__ import annotations

import pytest
import torch

from longctx.config import GPTConfig
from longctx.model import GPT
from longctx.train.loss import lm_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    # TF32 would round CUDA's fp32 matmuls to 10 mantissa bits: compare true fp32 on both devices
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _models(**overrides):
    torch.manual_seed(0)
    cpu = GPT(GPTConfig.from_preset("tiny", max_seq_len=512, **overrides))
    cuda = GPT(cpu.config).cuda()
    cuda.load_state_dict(cpu.state_dict())
    return cpu, cuda


def _batch(config, T=384, device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, T + 1), generator=g)
    b = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(T).expand(2, T)}
    return {k: v.to(device) for k, v in b.items()}


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_logits_and_grads_match_cpu(position):
    cpu, cuda = _models(position=position)
    losses, grads = [], []
    for model, dev in ((cpu, "cpu"), (cuda, "cuda")):
        loss = lm_loss(model, _batch(model.config, device=dev), chunk_size=128)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.cpu() for n, p in model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_checkpointing_and_bf16_on_cuda():
    from longctx.train.memory import apply_activation_checkpointing, autocast_context

    _, cuda = _models()
    batch = _batch(cuda.config, device="cuda")
    ref = lm_loss(cuda, batch, chunk_size=128)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in cuda.named_parameters()}
    cuda.zero_grad(set_to_none=True)
    apply_activation_checkpointing(cuda, "all", mlp_chunk=100)
    loss = lm_loss(cuda, batch, chunk_size=128)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for n, p in cuda.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    with autocast_context("cuda", "bf16"):
        bf = lm_loss(cuda, batch, chunk_size=128)
    assert abs(bf.item() - ref.item()) < 0.05  # bf16 matmuls: close, not equal


def test_cached_generation_matches_cpu():
    from longctx.infer.engine import generate_tokens

    cpu, cuda = _models()
    prompt = torch.randint(0, cpu.config.vocab_size, (200,), generator=torch.Generator().manual_seed(3))
    a = generate_tokens(cpu.eval(), prompt.tolist(), 24, prefill_chunk=64)
    b = generate_tokens(cuda.eval(), prompt.tolist(), 24, prefill_chunk=64)
    assert a == b
