"""Perplexity: against a direct float64 computation, against the HF docs' loop, and truncate mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longctx import GPT, GPTConfig
from longctx.errors import ConfigError, DataError
from longctx.eval.ppl import perplexities, perplexity, sliding_windows, split_documents

V = 260


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    # a larger init std than training's, so the predictions are far from uniform and errors would show
    cfg = GPTConfig(vocab_size=V, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=48, init_std=0.3)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def model64(model: GPT) -> GPT:
    m = GPT(model.config).double().eval()
    m.load_state_dict(model.state_dict())
    return m


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=170).astype(np.uint16)


def window_nll(m: GPT, ids: np.ndarray) -> float:
    """sum over t >= 1 of -log p(ids[t] | ids[:t]): full float64 logits, log_softmax, gather."""
    ids_t = torch.as_tensor(ids.astype(np.int64))
    with torch.no_grad():
        logp = torch.log_softmax(m(ids_t[None])[0].double(), dim=-1)  # (T, V)
    return -float(logp[:-1].gather(1, ids_t[1:, None]).sum())


def test_ppl_matches_direct_float64(model, model64, tokens):
    """Disjoint windows of 64: each window's tokens 1..63 scored with the window as context."""
    L = 64
    got = perplexity(model, tokens, L, progress=False)
    nll, count = 0.0, 0
    for b in range(0, len(tokens), L):
        win = tokens[b : b + L]
        nll += window_nll(model64, win)
        count += len(win) - 1
    assert got["tokens"] == count == len(tokens) - math.ceil(len(tokens) / L)
    assert got["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["beyond_trained_length"] is True  # 64 > max_seq_len 48: run anyway, but marked


def hf_docs_loop(m: GPT, encodings: torch.Tensor, max_length: int, stride: int):
    """The loop of HF's "Perplexity of fixed-length models", literally; `outputs.loss` is what a HF causal
    LM computes from labels (shift by one, mean cross-entropy over labels != -100)."""
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    windows = []
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            logits = m(input_ids)
            neg_log_likelihood = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), target_ids[:, 1:].reshape(-1), ignore_index=-100
            )
        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size  # subtract batch_size due to internal label shift
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        windows.append((float(neg_log_likelihood), int((target_ids[:, 1:] != -100).sum())))
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), windows


def test_disjoint_stride_equals_hf_docs_loop(model64, tokens):
    # (170 tokens: the docs' loop returns NaN when the last window holds a single token, 0 scored / 0)
    enc = torch.as_tensor(tokens.astype(np.int64))[None]
    want, _ = hf_docs_loop(model64, enc, 40, 40)
    got = perplexity(model64, tokens, 40, stride=40, progress=False)
    assert got["windows"] == 5
    assert got["ppl"] == pytest.approx(want, rel=1e-10)


def test_sliding_stride_scores_the_docs_loop_tokens(model64, tokens):
    """stride < length: the same windows, and each window's mean loss equals the docs' outputs.loss.
    The docs weight a window by (valid labels - 1), which undercounts windows after the first by one
    token (their first target is not dropped by the shift); we weight by the tokens actually scored."""
    enc = torch.as_tensor(tokens.astype(np.int64))[None]
    _, doc_windows = hf_docs_loop(model64, enc, 40, 24)
    got = perplexity(model64, tokens, 40, stride=24, progress=False, return_windows=True)
    assert len(got["per_window"]) == len(doc_windows)
    for mine, (loss, scored) in zip(got["per_window"], doc_windows):
        assert mine["scored"] == scored
        assert mine["nll_sum"] / mine["scored"] == pytest.approx(loss, rel=1e-10)
    exact = math.exp(sum(loss * n for loss, n in doc_windows) / sum(n for _, n in doc_windows))
    assert got["ppl"] == pytest.approx(exact, rel=1e-10)
    assert got["tokens"] == len(tokens) - 1  # every token but the first scored exactly once


def test_windows_cover_each_token_once():
    for n, L, s in [(100, 10, 10), (100, 10, 3), (101, 16, 7), (5, 8, 8), (37, 8, 8)]:
        seen = []
        for w in sliding_windows(n, L, s):
            assert w.end - w.begin <= L and w.begin < w.first_scored
            seen += range(w.first_scored, w.end)
        # overlapping windows score every token after the first; disjoint ones cannot score the first
        # token of each window (it has no context), as in HF's loop
        want = [t for t in range(1, n) if s < L or t % L]
        assert seen == want


def test_truncate_mode(model, model64):
    rng = np.random.default_rng(1)
    eos = 256
    docs = [rng.integers(0, 256, size=n) for n in (70, 20, 50, 33, 90)]
    stream = np.concatenate([np.append(d, eos) for d in docs]).astype(np.uint16)
    assert [len(d) for d in split_documents(stream, eos)] == [70, 20, 50, 33, 90]
    L = 33
    got = perplexity(model, stream, L, truncate=True, eos_id=eos, progress=False)
    nll, count = 0.0, 0
    for d in docs:
        if len(d) < L:
            continue
        nll += window_nll(model64, d[:L])
        count += L - 1
    assert got["mode"] == "truncate" and got["windows"] == 4 and got["documents_too_short"] == 1
    assert got["tokens"] == count
    assert got["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # max_windows keeps the first documents only
    two = perplexity(model, None, L, truncate=True, docs=docs, max_windows=2, progress=False)
    assert two["windows"] == 2


def test_several_lengths_share_windows_and_equal_the_hf_docs_loop(model64, tokens):
    """16 and 32 at once: the 16-windows that begin where a 32-window begins (0, 32, ..., 160) are read from
    it, and every length still equals HF's loop run at that length alone; with a stride too."""
    enc = torch.as_tensor(tokens.astype(np.int64))[None]
    short, long = perplexities(model64, tokens, [32, 16], progress=False)
    assert (short["length"], long["length"]) == (16, 32)
    assert short["windows"] == 11 and short["shared_windows"] == 6 and long["shared_windows"] == 0
    for got, L in ((short, 16), (long, 32)):
        assert got["ppl"] == pytest.approx(hf_docs_loop(model64, enc, L, L)[0], rel=1e-10)
    # stride 8 (whose windows the test below checks against the loop's): a 16-window is read from the
    # 32-window at its begin where that one scores the same tokens or more, and each length equals its run
    # alone, window by window
    s16, s32 = perplexities(model64, tokens, [16, 32], stride=8, progress=False, return_windows=True)
    assert s16["shared_windows"] == 1  # the first: later 32-windows score only their last 8 tokens
    for got, L in ((s16, 16), (s32, 32)):
        alone = perplexity(model64, tokens, L, stride=8, progress=False, return_windows=True)
        assert [w["nll_sum"] for w in got["per_window"]] == pytest.approx(
            [w["nll_sum"] for w in alone["per_window"]], rel=1e-12
        )


def test_length_dependent_positions_score_every_window(tokens):
    """Dynamic NTK rotates by the current length: a window's losses are not a longer one's prefix there, so
    nothing is shared and each length equals its own direct computation."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=V, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=16, init_std=0.3,
                    rope_scaling={"rope_type": "dynamic", "factor": 2.0})  # fmt: skip
    m = GPT(cfg).double().eval()
    assert m.positions.length_dependent
    short, long = perplexities(m, tokens, [16, 48], max_windows=2, progress=False)
    assert short["shared_windows"] == long["shared_windows"] == 0
    for got, L in ((short, 16), (long, 48)):
        nll = sum(window_nll(m, tokens[b : b + L]) for b in (0, L))
        assert got["ppl"] == pytest.approx(math.exp(nll / (2 * (L - 1))), rel=1e-10)
    # and the shared reading would have been wrong here: the 16-token prefix of the 48-window differs
    ids = torch.as_tensor(tokens[:48].astype(np.int64))
    with torch.no_grad():
        prefix = -torch.log_softmax(m(ids[None])[0], -1)[:15].gather(1, ids[1:16, None]).sum()
    assert window_nll(m, tokens[:16]) != pytest.approx(float(prefix), rel=1e-6)


def test_truncate_mode_several_lengths(model64):
    rng = np.random.default_rng(1)
    eos = 256
    docs = [rng.integers(0, 256, size=n) for n in (70, 20, 50, 33, 90)]
    stream = np.concatenate([np.append(d, eos) for d in docs]).astype(np.uint16)
    short, long = perplexities(model64, stream, [20, 50], truncate=True, eos_id=eos, progress=False)
    assert short["windows"] == 5 and short["shared_windows"] == 3  # the documents of 50 tokens or more
    for got, L in ((short, 20), (long, 50)):
        kept = [d for d in docs if len(d) >= L]
        nll = sum(window_nll(model64, d[:L]) for d in kept)
        assert got["ppl"] == pytest.approx(math.exp(nll / (len(kept) * (L - 1))), rel=1e-10)


def test_chunk_size_does_not_change_the_result(model, tokens):
    a = perplexity(model, tokens, 64, chunk_size=7, progress=False)
    b = perplexity(model, tokens, 64, chunk_size=4096, progress=False)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6)


def test_bad_inputs(model, tokens):
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, tokens, 32, stride=33, progress=False)
    with pytest.raises(DataError, match="fewer than one window"):
        perplexity(model, tokens[:10], 32, progress=False)
    with pytest.raises(DataError, match="no document"):
        perplexity(model, None, 64, truncate=True, docs=[tokens[:10]], progress=False)
    with pytest.raises(ConfigError, match="document boundaries"):
        perplexity(model, tokens, 64, truncate=True, progress=False)


@pytest.mark.parametrize("emulated", [True, False])
def test_bf16_logits_where_the_cpu_emulates_bf16(model, tokens, monkeypatch, emulated):
    """A bf16 model's logits: on fp32 arithmetic where the CPU would emulate bf16 GEMMs (the products of
    the bf16 values, not rounded to bf16 after), else torch's bf16 GEMM; both against a float64
    computation on the same bf16 hidden states and head weight."""
    from longctx.eval import ppl

    monkeypatch.setattr(ppl, "cpu_emulates", lambda dtype: emulated)
    m16 = GPT(model.config).eval()
    m16.load_state_dict(model.state_dict())
    m16 = m16.to(torch.bfloat16)
    ids = torch.as_tensor(tokens[:40].astype(np.int64))
    nll, greedy = ppl.score_tokens(m16, ids, 1, with_greedy=True)
    with torch.no_grad():
        hidden = m16.hidden_states(ids[None])[0, :-1].double()  # bf16 values, exactly
    logp = torch.log_softmax(hidden @ m16.head_weight.double().T, dim=-1)
    want = -logp.gather(1, ids[1:, None]).squeeze(1)
    # fp32 accumulation of exact bf16 products: float rounding only; bf16 logits: a bf16 step (2^-8)
    tol = 1e-5 if emulated else 0.1
    torch.testing.assert_close(nll, want, rtol=0, atol=tol)
    # the greedy check (lm-eval's) from the same logits: the argmax wherever it is clear of a near tie
    top2 = logp.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
    assert clear.sum() > 30
    assert torch.equal(greedy[clear], (logp.argmax(-1) == ids[1:])[clear])
