"""Length-dependent RoPE (dynamic NTK, dynamic YaRN, LongRoPE) with a KV cache: cached generation must equal
recomputing the whole prefix at every step, also past the original length (transformers issue #25104: a
cache of keys rotated under an older base disagrees).

Keeping keys un-rotated and rotating them at read time makes one attention layer exact. With several
layers, the cached values and the deeper layers' keys were computed by earlier layers under the frequencies
of *their* step, so a full recompute at a new length differs; exactness then needs a re-prefill whenever the
frequencies change: once for LongRoPE (short -> long), every step past L for dynamic NTK/YaRN. Both are
checked here."""

from __future__ import annotations

import pytest
import torch

from longctx.config import GPTConfig
from longctx.infer.cache import KVCache
from longctx.infer.engine import generate_tokens
from longctx.infer.generate import prefill
from longctx.model import GPT

L, TOTAL, PROMPT = 32, 80, 10


def _longrope() -> dict:
    n = 16 // 2  # head_dim 16
    return {
        "rope_type": "longrope",
        "original_max_position_embeddings": L,
        "factor": TOTAL / L,
        "short_factor": [1.0 + 0.05 * i for i in range(n)],
        "long_factor": [1.0 + 0.5 * i for i in range(n)],
    }


SCALINGS = {
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "dynamic_yarn": {"rope_type": "dynamic_yarn", "factor": 4.0, "original_max_position_embeddings": L},
    "longrope": _longrope(),
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L},
}


def _model(rope_scaling: dict, n_layer: int = 1) -> GPT:
    torch.manual_seed(0)
    # a larger init than training's makes the logits decisive, so greedy choices are not near-ties
    config = GPTConfig(
        vocab_size=64,
        n_layer=n_layer,
        n_head=4,
        d_model=64,
        max_seq_len=L,
        rope_theta=100.0,
        rope_scaling=rope_scaling,
        init_std=0.2,
    )
    return GPT(config).eval()


@torch.no_grad()
def _uncached_greedy(model: GPT, prompt: list[int], n_new: int) -> tuple[list[int], list[torch.Tensor]]:
    ids, logits_seen = list(prompt), []
    for _ in range(n_new):
        logits = model(torch.tensor([ids]))[0, -1]  # the whole prefix, positions 0..t, every step
        logits_seen.append(logits)
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :], logits_seen


@torch.no_grad()
def _cached_logits(model: GPT, tokens: list[int], rotate_on_read: bool | None) -> list[torch.Tensor]:
    """Teacher-forced decode of `tokens` through a KV cache: logits after each prefix of length >= PROMPT."""
    cache = KVCache(model.config, 1, len(tokens), rotate_on_read=rotate_on_read)
    out = [prefill(model, cache, torch.tensor([tokens[:PROMPT]]))[0]]
    for t in tokens[PROMPT:-1]:
        out.append(model.logits(model.hidden_states(torch.tensor([[t]]), cache=cache))[0, -1])
    return out


@pytest.mark.parametrize("name", list(SCALINGS))
def test_cached_generation_equals_uncached_past_original_length(name):
    model = _model(SCALINGS[name])
    prompt = torch.randint(0, 64, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_tokens, ref_logits = _uncached_greedy(model, prompt, TOTAL - PROMPT)
    assert generate_tokens(model, prompt, TOTAL - PROMPT) == ref_tokens
    cached = _cached_logits(model, prompt + ref_tokens, rotate_on_read=None)  # auto: as the engine does
    assert len(cached) == len(ref_logits) == TOTAL - PROMPT
    for step, (a, b) in enumerate(zip(cached, ref_logits)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{name}: step {step}")
    assert KVCache(model.config, 1, 4).rotate_on_read == (name != "yarn")


@pytest.mark.parametrize("name", ["dynamic", "dynamic_yarn", "longrope"])
def test_keys_rotated_at_write_would_disagree(name):
    """The test above has teeth: a cache that stores keys rotated under the base of their own step
    diverges from the reference once the length passes L."""
    model = _model(SCALINGS[name])
    prompt = torch.randint(0, 64, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_tokens, ref_logits = _uncached_greedy(model, prompt, TOTAL - PROMPT)
    stale = _cached_logits(model, prompt + ref_tokens, rotate_on_read=False)
    within = L - PROMPT - 1  # last step whose length is still <= L: no frequency change yet
    torch.testing.assert_close(stale[within], ref_logits[within], rtol=1e-4, atol=1e-4)
    assert (stale[-1] - ref_logits[-1]).abs().max() > 1e-3


def _exact_engine_greedy(model: GPT, prompt: list[int], n_new: int, monkeypatch) -> tuple[list[int], int]:
    """The engine's exact_dynamic mode: greedy tokens and the number of (re)prefills it ran."""
    import longctx.infer.engine as engine

    calls = []
    real = engine.prefill
    monkeypatch.setattr(engine, "prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    e = engine.Engine(model, exact_dynamic=True, stop_at_eos=False)
    tokens = e.generate(prompt, engine.SamplingParams(max_tokens=n_new)).token_ids
    return tokens, len(calls)


def test_longrope_two_layers_exact_with_one_rebuild(monkeypatch):
    model = _model(SCALINGS["longrope"], n_layer=2)
    prompt = torch.randint(0, 64, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_tokens, _ = _uncached_greedy(model, prompt, TOTAL - PROMPT)
    tokens, prefills = _exact_engine_greedy(model, prompt, TOTAL - PROMPT, monkeypatch)
    assert tokens == ref_tokens
    assert prefills == 2  # the prompt, then once when the length passes L (short -> long factors)


@pytest.mark.parametrize("name", ["dynamic", "dynamic_yarn"])
def test_dynamic_two_layers_exact_with_rebuilds(name, monkeypatch):
    model = _model(SCALINGS[name], n_layer=2)
    prompt = torch.randint(0, 64, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_tokens, _ = _uncached_greedy(model, prompt, TOTAL - PROMPT)
    tokens, prefills = _exact_engine_greedy(model, prompt, TOTAL - PROMPT, monkeypatch)
    assert tokens == ref_tokens
    # every step that grows the length past L changes the base: lengths L+1 .. TOTAL-1 (the last token is
    # generated, never fed)
    assert prefills == 1 + (TOTAL - 1 - L)
