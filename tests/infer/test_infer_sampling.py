"""Sampling processors against independent references: numpy for top-p, transformers' logits processors for
repetition penalty / top-k / top-p, and the engine's seeded sampling for reproducibility."""

import numpy as np
import pytest
import torch

from longctx import GPT, GPTConfig
from longctx.data.tokenizer import ByteTokenizer
from longctx.errors import ConfigError
from longctx.infer.engine import Engine
from longctx.infer.sampling import (
    SamplingParams,
    make_generator,
    repetition_penalty,
    sample_next,
    top_k_filter,
    top_p_filter,
)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", n_layer=2, init_std=0.3)).eval()
    return Engine(model, ByteTokenizer(), stop_at_eos=False)


def _numpy_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Reference nucleus: most likely first, keep tokens until the kept mass reaches p."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros_like(probs, dtype=bool)
    mass = 0.0
    for i in order:
        keep[i] = True
        mass += probs[i]
        if mass >= p:
            break
    return keep


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_numpy_reference(p):
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        logits = torch.randn(50, generator=g, dtype=torch.float64) * 3
        kept = torch.isfinite(top_p_filter(logits, p)).numpy()
        np.testing.assert_array_equal(kept, _numpy_top_p(logits.numpy(), p))


def test_processors_match_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(2)
    for penalty in (0.7, 1.3, 2.0):
        logits = torch.randn(40, generator=g)
        prev = torch.randint(0, 40, (12,), generator=g)  # repeats on purpose
        want = RepetitionPenaltyLogitsProcessor(penalty)(prev[None], logits[None].clone())[0]
        torch.testing.assert_close(repetition_penalty(logits, prev, penalty), want, rtol=0, atol=0)
    for k in (1, 5, 39):
        logits = torch.randn(40, generator=g)
        want = TopKLogitsWarper(k)(None, logits[None].clone())[0]
        torch.testing.assert_close(top_k_filter(logits, k), want, rtol=0, atol=0)
    for p in (0.3, 0.8):
        logits = torch.randn(40, generator=g)
        want = TopPLogitsWarper(p)(None, logits[None].clone())[0]
        torch.testing.assert_close(top_p_filter(logits, p), want, rtol=0, atol=0)


def test_sampling_follows_the_distribution():
    # with top-k 3 and temperature 1 the empirical frequencies match softmax over the 3 kept logits
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    params = SamplingParams(temperature=1.0, top_k=3)
    g = make_generator(0)
    counts = np.bincount(
        [sample_next(logits, params, torch.empty(0, dtype=torch.long), g) for _ in range(4000)], minlength=5
    )
    want = torch.softmax(logits[:3], -1).numpy()
    assert counts[3:].sum() == 0
    np.testing.assert_allclose(counts[:3] / 4000, want, atol=0.03)


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.95, seed=123)
    a = engine.generate("Hello", params).token_ids
    b = engine.generate("Hello", params).token_ids
    c = engine.generate(
        "Hello", SamplingParams(max_tokens=30, temperature=1.0, top_p=0.95, seed=124)
    ).token_ids
    assert a == b
    assert a != c


def test_top_k_one_equals_greedy(engine):
    greedy = engine.generate("The cat", SamplingParams(max_tokens=25)).token_ids
    top1 = engine.generate(
        "The cat", SamplingParams(max_tokens=25, temperature=1.5, top_k=1, seed=7)
    ).token_ids
    assert top1 == greedy


def test_stop_strings_and_max_tokens(engine):
    full = engine.generate("ab", SamplingParams(max_tokens=40))
    assert len(full.token_ids) == 40 and full.finish_reason == "length"
    stop = full.text[10:12]  # a string the greedy continuation is known to contain
    cut = engine.generate("ab", SamplingParams(max_tokens=40, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    streamed = []
    engine.generate("ab", SamplingParams(max_tokens=40, stop=[stop]), on_delta=streamed.append)
    assert "".join(streamed) == cut.text


def test_bad_params_are_config_errors(engine):
    for bad in (
        dict(max_tokens=0),
        dict(temperature=-1),
        dict(top_p=0.0),
        dict(top_k=-2),
        dict(repetition_penalty=0.0),
        dict(stop=[""]),
    ):
        with pytest.raises(ConfigError):
            engine.generate("x", SamplingParams(**bad))
