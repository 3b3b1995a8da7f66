"""The engine's prompt cache against the engine without it: every logit the sampler sees is bit for bit the
same (one row), the same tokens in padded batches, states actually reused, memory bounded, evaluations'
scores unchanged."""

import random

import pytest
import torch

import longctx.infer.engine as engine_module
from longctx import GPT, GPTConfig
from longctx.data.tokenizer import ByteTokenizer
from longctx.eval.passkey import evaluate_passkey
from longctx.infer.engine import Engine, EngineSpec, Request
from longctx.infer.prompt_cache import PromptCache
from longctx.infer.sampling import SamplingParams


def _model(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, max_seq_len=256, init_std=0.3)
    return GPT(GPTConfig.from_preset("tiny", **{**cfg, **overrides})).eval()


def _prompts(seed: int = 0) -> list[list[int]]:
    """A document, questions after it, the document with its end changed, a next turn, an unrelated one."""
    rng = random.Random(seed)
    doc = [rng.randrange(256) for _ in range(90)]
    return [
        doc + [1, 2, 3],
        doc + [9, 8, 7, 6],
        doc[:50] + [rng.randrange(256) for _ in range(30)],
        doc + [1, 2, 3, 40, 41, 42, 43, 44, 45, 46, 47],  # the first prompt, continued
        [rng.randrange(256) for _ in range(70)],
        doc + [1, 2, 3],  # the first again: all but the last chunk reused
    ]


def _run(engine: Engine, prompts, monkeypatch, batch: bool = False):
    """-> (tokens per prompt, the logits the sampler saw, in order)."""
    seen = []
    real = engine_module.sample_next

    def spy(logits, *args):
        seen.append(logits.clone())
        return real(logits, *args)

    monkeypatch.setattr(engine_module, "sample_next", spy)
    params = SamplingParams(max_tokens=6)
    if batch:
        outs = engine.run([Request(p, params) for p in prompts])
    else:
        outs = [engine.run([Request(p, params)])[0] for p in prompts]
    monkeypatch.setattr(engine_module, "sample_next", real)
    return [o.token_ids for o in outs], seen


CASES = {
    "rope": {},
    "gqa + yarn (keys rotated at read)": dict(
        n_kv_head=2, rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_seq_len=128
    ),
    "self-extend": dict(
        context_method={"type": "self_extend", "group_size": 4, "window": 32}, max_seq_len=96
    ),
    "alibi": dict(position="alibi"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_one_row_logits_identical_with_and_without(case, kv_dtype, monkeypatch):
    model = _model(**CASES[case])
    spec = EngineSpec(prefill_chunk=16, kv_dtype=kv_dtype)
    cached = Engine(model, None, spec, stop_at_eos=False)
    plain = Engine(model, None, spec, stop_at_eos=False, prompt_cache_mb=0)
    prompts = _prompts()
    want_tokens, want_logits = _run(plain, prompts, monkeypatch)
    got_tokens, got_logits = _run(cached, prompts, monkeypatch)
    assert got_tokens == want_tokens
    assert len(got_logits) == len(want_logits)
    for g, w in zip(got_logits, want_logits):
        assert torch.equal(g, w)
    stats = cached.prompt_cache_stats()
    # prompts 2, 3, 4 and 6 share >= 3 chunks of 16 with an earlier one
    assert stats["hits"] == 4, stats
    assert stats["reused_tokens"] == 80 + 48 + 80 + 80
    assert plain.prompt_cache_stats() is None


def test_padded_batch_same_tokens_and_states_reused(monkeypatch):
    model = _model()
    spec = EngineSpec(prefill_chunk=16, max_batch=8)
    cached = Engine(model, None, spec, stop_at_eos=False)
    plain = Engine(model, None, spec, stop_at_eos=False, prompt_cache_mb=0)
    prompts = _prompts()
    first, rest = prompts[:1], prompts[1:]
    want = _run(plain, first, monkeypatch, batch=True)[0] + _run(plain, rest, monkeypatch, batch=True)[0]
    got_first, _ = _run(cached, first, monkeypatch, batch=True)
    got_rest, logits = _run(cached, rest, monkeypatch, batch=True)
    assert got_first + got_rest == want
    _, plain_logits = _run(plain, rest, monkeypatch, batch=True)
    for g, w in zip(logits, plain_logits):  # rows of a padded batch start from other chunk boundaries
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert cached.prompt_cache_stats()["hits"] >= 3


def test_memory_bound_lru_and_extension():
    make = lambda n: {"k": torch.zeros(2, 1, n, 4), "v": torch.zeros(2, 1, n, 4)}  # noqa: E731
    per_token = 2 * (2 * 4 * 4)  # bytes of one token's k and v
    cache = PromptCache(max_bytes=100 * per_token, block=10)
    a, b = list(range(40)), [7] * 40
    cache.store(a, lambda: make(40))
    cache.store(b, lambda: make(40))
    assert cache.nbytes == 80 * per_token and len(cache.entries) == 2
    assert cache.lookup(a + [99])[0] == 40  # a is now the most recently used
    cache.store(list(range(30)), lambda: pytest.fail("covered by a: nothing to copy"))
    cache.store(a + list(range(100, 120)), lambda: make(60))  # extends a: replaces it (60 tokens)
    assert cache.nbytes == 100 * per_token and len(cache.entries) == 2
    cache.store([5] * 30, lambda: make(30))  # over budget: the least recently used (b) goes
    assert len(cache.entries) == 2 and cache.nbytes == 90 * per_token
    assert cache.lookup(b + [1])[0] == 0
    assert cache.lookup([5] * 25)[0] == 20  # whole blocks only, never the last token
    assert cache.lookup([5] * 20)[0] == 10
    cache.store(list(range(200)), lambda: make(200))  # larger than the whole budget: not kept
    assert cache.nbytes == 90 * per_token
    stats = cache.stats()
    assert stats["lookups"] == 4 and stats["hits"] == 3 and 0 < stats["hit_rate"] < 1


def test_streaming_keeps_no_prompts():
    engine = Engine(_model(), None, EngineSpec(sinks=4, window=60), stop_at_eos=False)
    assert engine.prompt_cache is None


def test_passkey_scores_unchanged_and_haystack_reused():
    """Trials at one depth share the haystack before the key: the evaluation reuses it, with the same
    outputs as without the cache."""
    model, tok = _model(max_seq_len=512), ByteTokenizer()
    run = lambda mb: evaluate_passkey(  # noqa: E731
        model, tok, [300], depths=[60], trials=3, progress=False,
        engine_spec=EngineSpec(prefill_chunk=32, prompt_cache_mb=mb),
    )  # fmt: skip
    assert run(64)["samples"] == run(0)["samples"]


def test_health_and_usage_report_the_prompt_cache():
    from fastapi.testclient import TestClient

    from longctx.serve.app import create_app

    engine = Engine(_model(), ByteTokenizer(), EngineSpec(prefill_chunk=16))
    with TestClient(create_app(engine, model_id="tiny")) as client:
        body = {"model": "tiny", "prompt": "x" * 60, "max_tokens": 2}
        cached = []
        for _ in range(2):
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        stats = client.get("/health").json()["prompt_cache"]
    assert stats["lookups"] == 2 and stats["hits"] == 1 and stats["reused_tokens"] == 48
    assert cached == [0, 48]  # each response's usage says what it reused
