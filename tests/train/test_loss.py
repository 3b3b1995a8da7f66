"""The chunked LM loss against the plain path (full logits + F.cross_entropy) and float64 gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longctx.config import GPTConfig
from longctx.errors import ConfigError
from longctx.kernels import fused
from longctx.model import GPT
from longctx.train.loss import IGNORE_INDEX, LossBuffers, chunked_cross_entropy, chunked_nll, lm_loss


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(params=["native", "torch"])
def softmax_step(request, monkeypatch):
    """The chunks' softmax step through the native kernel (where it runs) and through torch's ops."""
    if request.param == "native" and not fused.softmax_xent_runs(torch.empty(1, 8)):
        pytest.skip("the native kernels cannot run here")
    if request.param == "torch":
        monkeypatch.setattr(fused, "softmax_xent_runs", lambda logits: False)
        monkeypatch.setattr(fused, "softmax_xent_", lambda logits, labels: None)
    return request.param


def _data(N=53, d=24, V=97, ignore_every=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=dtype)
    w = torch.randn(V, d, generator=g, dtype=dtype) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        y[::ignore_every] = IGNORE_INDEX
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 7, 16, 53, 1000])
def test_loss_and_grads_match_plain_cross_entropy(chunk, softmax_step):
    h, w, y = _data()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(h1 @ w1.T, y, ignore_index=IGNORE_INDEX)  # independent reference
    ref.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = chunked_cross_entropy(h2, w2, y, chunk_size=chunk)
    out.backward()
    assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert _rel(h2.grad, h1.grad) <= 1e-5
    assert _rel(w2.grad, w1.grad) <= 1e-5
    assert torch.all(h2.grad[::4] == 0)  # ignored tokens get no gradient


@pytest.mark.parametrize("chunk", [16, 150])  # several chunks (grad_W summed over them in fp32), and one
def test_cpu_autocast_within_bf16_roundings_of_float64(chunk, softmax_step):
    """Under CPU autocast (bf16) against float64 on the same bf16-rounded h and W. With u = 2^-8 the loss
    rounds the logits z (|dz| <= u |z|, so each softmax p_j moves by at most 2u p_j zmax, zmax a row's max
    |z|, and the mean nll by at most 2u mean(zmax)), rounds dlogits D = p - onehot (u |D|), and each chunk's
    gradient (u |grad|). So |grad_h - ref| <= scale E |W| + u |ref| and |grad_W - ref| <= scale E^T |h| +
    u scale |D|^T |h|, with E = u |D| + 2u p zmax; times (1 + 4u) for the second-order terms."""
    u = 2.0**-8
    h, w, y = _data(N=150, d=32, V=300, seed=3)
    h, w = h.bfloat16().float(), w.bfloat16().float()  # exact in bf16: the casts inside add nothing
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_cross_entropy(h1, w1, y, chunk_size=chunk)
    out.backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.T, y, ignore_index=IGNORE_INDEX)
    ref.backward()
    keep = (y != IGNORE_INDEX).double()[:, None]
    scale = 1.0 / keep.sum()
    z = h.double() @ w.double().T
    p = z.softmax(-1) * keep
    D = p - F.one_hot(y.clamp_min(0), 300).double() * keep
    E = u * D.abs() + 2 * u * p * z.abs().amax(-1, keepdim=True)
    zmax = (z.abs().amax(-1, keepdim=True) * keep).sum() * scale
    assert out.dtype == torch.float32 and abs(out.item() - ref.item()) <= 2 * u * zmax * (1 + 4 * u)
    bounds = {
        "h": (scale * E @ w.double().abs() + u * h64.grad.abs()) * (1 + 4 * u),
        "W": (scale * E.T @ h.double().abs() + u * scale * D.abs().T @ h.double().abs()) * (1 + 4 * u),
    }
    for name, got, want in (("h", h1.grad, h64.grad), ("W", w1.grad, w64.grad)):
        err = (got.double() - want).abs()
        assert got.dtype == torch.float32 and (err <= bounds[name]).all(), f"grad {name}"
        assert err.max() > 1e-6  # it did compute in bf16 (fp32 arithmetic would be ~1e-8 off)


def test_sum_reduction_and_upstream_grad_scale():
    h, w, y = _data(ignore_every=0)
    h1 = h.clone().requires_grad_()
    (3.0 * F.cross_entropy(h1 @ w.T, y, reduction="sum")).backward()
    h2 = h.clone().requires_grad_()
    (3.0 * chunked_cross_entropy(h2, w, y, chunk_size=10, reduction="sum")).backward()
    assert _rel(h2.grad, h1.grad) <= 1e-5


def test_retained_graph_gives_the_same_gradients_twice():
    # the backward hands over its stored gradients when the upstream gradient is 1: a retained graph must
    # still give them unchanged the second time, whatever happened to the first .grad
    h, w, y = _data()
    w1 = w.clone().requires_grad_()
    F.cross_entropy(h @ w1.T, y, ignore_index=IGNORE_INDEX).backward()
    w2 = w.clone().requires_grad_()
    out = chunked_cross_entropy(h, w2, y, chunk_size=16)
    out.backward(retain_graph=True)
    first = w2.grad
    w2.grad = None
    first.mul_(0.5)  # what clip_grad_norm_ does to a .grad
    out.backward()
    assert _rel(w2.grad, w1.grad) <= 1e-5


def test_gradcheck_float64():
    h, w, y = _data(N=13, d=5, V=11, ignore_every=3, dtype=torch.float64)
    h.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: chunked_cross_entropy(a, b, y, chunk_size=4), (h, w))


def test_all_ignored_gives_zero_loss_and_grads():
    h, w, y = _data(N=9)
    y[:] = IGNORE_INDEX
    h.requires_grad_()
    out = chunked_cross_entropy(h, w, y, chunk_size=4)
    out.backward()
    assert out.item() == 0.0 and torch.all(h.grad == 0)


def test_chunked_nll_matches_per_token_cross_entropy():
    h, w, y = _data()
    ref = F.cross_entropy(h @ w.T, y, ignore_index=IGNORE_INDEX, reduction="none")
    got = chunked_nll(h, w, y, chunk_size=8)
    assert not got.requires_grad
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_lm_loss_matches_model_logits(tie):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", tie_embeddings=tie, n_layer=2))
    B, T = 2, 40
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, :5] = IGNORE_INDEX
    pos = torch.arange(T).expand(B, T)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}

    model.zero_grad()
    ref = F.cross_entropy(model(ids, pos).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    out = lm_loss(model, batch, chunk_size=16)
    out.backward()
    assert abs(out.item() - ref.item()) <= 1e-5 * ref.item()
    for n, p in model.named_parameters():
        assert _rel(p.grad, ref_grads[n]) <= 1e-5, n  # incl. the tied embedding (lookup + head grads)

    model.zero_grad()
    plain = lm_loss(model, batch, chunk_size=None)
    assert abs(plain.item() - ref.item()) <= 1e-6 * ref.item()


def test_bad_input_raises_config_error():
    h, w, y = _data()
    with pytest.raises(ConfigError, match="chunk_size"):
        chunked_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ConfigError, match="mismatch"):
        chunked_cross_entropy(h, w, y[:-1], chunk_size=8)
    for label in (w.shape[0], -3):  # past the vocabulary, or negative but not the ignore index
        bad = y.clone()
        bad[2] = label
        with pytest.raises(ConfigError, match=f"label {label} is outside the vocabulary"):
            chunked_cross_entropy(h, w, bad, chunk_size=8)


def test_no_grad_path_matches_and_builds_no_graph():
    h, w, y = _data()
    h.requires_grad_()
    with torch.no_grad():
        out = chunked_cross_entropy(h, w, y, chunk_size=8, reduction="sum")
    ref = F.cross_entropy(h.detach() @ w.T, y, ignore_index=IGNORE_INDEX, reduction="sum")
    assert not out.requires_grad
    assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item())


@pytest.mark.parametrize("autocast", [False, True])
def test_buffers_kept_across_calls_give_the_same_loss_and_grads(autocast, softmax_step):
    """A training loop's LossBuffers: the scratch tensors are reused from one call to the next (no fresh
    allocation) and the losses and gradients are exactly those of a call without them; what the loss
    returns (the gradients) never lives in the buffers."""
    buffers = LossBuffers()
    results, kept = [], []
    for seed, use in ((0, None), (0, buffers), (1, None), (1, buffers), (1, buffers)):
        h, w, y = _data(seed=seed)
        h, w = h.requires_grad_(), w.requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = chunked_cross_entropy(h, w, y, chunk_size=16, buffers=use)
        out.backward()
        results.append((out.detach(), h.grad, w.grad))
        if use is not None:
            kept.append({name: t.data_ptr() for name, t in buffers._kept.items()})
            assert all(t.data_ptr() not in kept[-1].values() for t in (h.grad, w.grad))
            h.grad = w.grad = None  # released, as the trainer's zero_grad does
    assert kept[0] and kept[0] == kept[1] == kept[2]  # the same tensors each call
    for a, b in ((0, 1), (2, 3), (2, 4)):
        assert all(torch.equal(x, z) for x, z in zip(results[a], results[b]))


def test_head_gradient_kept_only_once_released():
    """The head's gradient handed out under autocast comes from a kept tensor: the same memory on the next
    call once the .grad was released (set to None), fresh while it is alive, so two backward passes into one
    .grad (micro-batches) sum exactly as without buffers."""
    buffers = LossBuffers()
    (h, w, y), (h2, _, y2) = _data(seed=0), _data(seed=1)
    w = w.requires_grad_()

    def grad_after(*batches, use):
        w.grad = None
        for hh, yy in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                chunked_cross_entropy(hh, w, yy, chunk_size=16, buffers=use).backward()
        return w.grad

    first = grad_after((h, y), use=buffers)
    ptr, first = first.data_ptr(), first.clone()
    assert grad_after((h, y), use=buffers).data_ptr() == ptr  # released by grad_after: the kept memory again
    assert torch.equal(grad_after((h, y), use=buffers), first)
    both = grad_after((h, y), (h2, y2), use=buffers)
    assert torch.equal(both, grad_after((h, y), (h2, y2), use=None))  # the live .grad never overwritten
    assert torch.equal(both, first + grad_after((h2, y2), use=None))
