"""The KV-cache engine against full recomputation: cached == uncached, streaming == recompute on the kept
tokens with re-assigned positions, int8 close to fp32, batched == one by one."""

import pytest
import torch

from longctx import GPT, GPTConfig
from longctx.data.tokenizer import ByteTokenizer
from longctx.errors import ConfigError
from longctx.infer.cache import Int8KVCache, KVCache, make_cache
from longctx.infer.engine import Engine, Request, generate_tokens
from longctx.infer.generate import forward_last, prefill
from longctx.infer.sampling import SamplingParams
from longctx.positions.rope import length_dependent_types


def _model(**overrides) -> GPT:
    torch.manual_seed(0)
    # a large init std gives a random model peaked, varied next-token distributions (no argmax ties)
    cfg = dict(n_layer=2, max_seq_len=128, init_std=0.3)
    return GPT(GPTConfig.from_preset("tiny", **{**cfg, **overrides})).eval()


@torch.no_grad()
def _greedy_reference(model: GPT, prompt: list[int], n: int) -> list[int]:
    """No cache: the whole sequence through the model for every new token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 84, 104, 101, 32, 113]


@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "sinusoidal", "none"])
def test_cached_greedy_equals_uncached(position):
    model = _model(position=position)
    want = _greedy_reference(model, PROMPT, 24)
    assert len(set(want)) > 3  # the check means something only if the continuation varies
    assert generate_tokens(model, PROMPT, 24, prefill_chunk=5) == want  # chunked prefill with masks


def test_rotate_on_read_cache_matches_full_forward():
    # keys kept un-rotated and rotated at read time (what dynamic scalings and streaming need)
    model = _model().double()  # float64: different summation orders agree to ~1e-12
    ids = torch.tensor([PROMPT])
    cache = KVCache(model.config, 1, 64, rotate_on_read=True, dtype=torch.float64)
    logits = prefill(model, cache, ids[:, :11], chunk=4)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids[:, :11])[:, -1])
        for t in range(11, ids.shape[1]):
            logits = forward_last(model, cache, ids[:, t : t + 1])
            torch.testing.assert_close(logits, model(ids[:, : t + 1])[:, -1])


def _dynamic_scaling(rope_type: str, rotary_dim: int) -> dict:
    scaling = {"rope_type": rope_type, "factor": 4.0}
    if rope_type == "longrope":  # per-dimension factors: short ones inside the original length, long past it
        scaling.update(
            short_factor=[1.0] * (rotary_dim // 2), long_factor=[1.0 + i / 4 for i in range(rotary_dim // 2)]
        )
    return scaling


@torch.no_grad()
def _step_logits(model: GPT, cache: KVCache, ids: torch.Tensor, start: int) -> list[torch.Tensor]:
    logits = [prefill(model, cache, ids[:, :start], chunk=6)]
    for t in range(start, ids.shape[1]):
        logits.append(forward_last(model, cache, ids[:, t : t + 1]))
    return logits


@pytest.mark.parametrize("rope_type", sorted(length_dependent_types()) or ["none-registered"])
def test_dynamic_scaling_cached_equals_uncached(rope_type):
    """Length-dependent RoPE: with keys rotated on read, every step uses the frequencies of the current
    length, as a full forward does. One layer, so cached keys/values depend on their token only and the
    match is exact; the same run with keys rotated once when stored (transformers #25104) drifts."""
    if rope_type == "none-registered":
        pytest.skip("no length-dependent RoPE scaling registered")
    rotary_dim = GPTConfig.from_preset("tiny").rotary_dim
    model = _model(n_layer=1, max_seq_len=16, rope_scaling=_dynamic_scaling(rope_type, rotary_dim)).double()
    ids = torch.tensor([PROMPT + PROMPT[:13]])  # 32 tokens: crosses the 16 the model was built for
    cache = KVCache(model.config, 1, 40, dtype=torch.float64)
    assert cache.rotate_on_read
    want = [model(ids[:, :t])[:, -1] for t in range(10, ids.shape[1] + 1)]
    for got, ref in zip(_step_logits(model, cache, ids, 10), want):
        torch.testing.assert_close(got, ref)
    stale = KVCache(model.config, 1, 40, dtype=torch.float64, rotate_on_read=False)
    assert any(not torch.allclose(got, ref) for got, ref in zip(_step_logits(model, stale, ids, 10), want))
    assert generate_tokens(model, PROMPT, 20, prefill_chunk=6) == _greedy_reference(model, PROMPT, 20)


def test_streaming_equals_recompute_on_sinks_plus_window():
    # one layer: cached keys/values depend on their token only, so the streaming cache must give exactly
    # the logits of a full forward over [first sinks tokens] + [last window tokens] at positions 0..S+W-1
    model = _model(n_layer=1, max_seq_len=32).double()
    sinks, window = 4, 12
    seq = list(PROMPT) + PROMPT[:7]  # 26 prompt tokens: the prefill itself already evicts
    cache = make_cache(model.config, 1, sinks + window, sinks=sinks, dtype=torch.float64)
    k_ptr, nbytes = cache.k.data_ptr(), cache.nbytes
    logits = prefill(model, cache, torch.tensor([seq]), chunk=5)
    with torch.no_grad():
        for _ in range(60):  # 86 tokens in all: far past the 32 the model was built for
            kept = seq[:sinks] + seq[-window:]
            want = model(torch.tensor([kept]))[:, -1]  # positions 0..15: re-assigned
            torch.testing.assert_close(logits, want)
            seq.append(int(logits.argmax()))
            logits = forward_last(model, cache, torch.tensor([[seq[-1]]]))
            assert cache.length == sinks + window
    assert cache.evicted == len(seq) - sinks - window
    assert cache.nbytes == nbytes and cache.k.data_ptr() == k_ptr  # constant memory, no re-allocation


def test_streaming_engine_runs_past_trained_length_at_constant_memory():
    model = _model(max_seq_len=64)
    engine = Engine(model, sinks=4, window=28)
    cache = engine.cache_for(1, 10_000)
    assert cache.max_len == 32 and cache.rotate_on_read
    out = engine.generate(PROMPT, SamplingParams(max_tokens=200, temperature=1.0, seed=0))
    assert len(out.token_ids) == 200  # 219 tokens through a 64-token model with a 32-slot cache
    with pytest.raises(ConfigError, match="window"):
        cache.reserve(40)


def test_int8_cache_close_to_fp32_and_smaller():
    model = _model(n_layer=4, init_std=0.05)
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (1, 100))
    fp32 = make_cache(model.config, 1, 100)
    int8 = make_cache(model.config, 1, 100, kv_dtype="int8")
    assert isinstance(int8, Int8KVCache)
    hd = model.config.head_dim
    assert int8.nbytes / fp32.nbytes == pytest.approx((hd * 1 + 4) / (hd * 4))  # int8 values + fp32 scale
    a, b = prefill(model, fp32, ids, chunk=32), prefill(model, int8, ids, chunk=32)
    assert not torch.equal(a, b)
    # the worst logit moves by under 1% of the logits' spread; the next-token distributions barely differ
    assert (a - b).abs().max() < 0.01 * (a.max() - a.min())
    pa, pb = a.log_softmax(-1), b.log_softmax(-1)
    assert (pa.exp() * (pa - pb)).sum() < 1e-4  # KL(fp32 || int8) in nats


def test_int8_quantize_error_bound():
    x = torch.randn(3, 5, 64) * torch.logspace(-3, 2, 5)[None, :, None]
    q, scale = Int8KVCache.quantize(x)
    assert q.dtype == torch.int8
    assert ((q.float() * scale - x).abs() <= scale / 2 + 1e-6 * x.abs()).all()


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
def test_batched_equals_one_by_one(position):
    model = _model(position=position)
    engine = Engine(model, ByteTokenizer(), max_batch=8)
    reqs = [
        Request(PROMPT[:3], SamplingParams(max_tokens=12)),
        Request(PROMPT, SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=5)),
        Request(
            PROMPT[4:13],
            SamplingParams(max_tokens=7, temperature=1.2, top_k=20, seed=6, repetition_penalty=1.3),
        ),
        Request(PROMPT[2:], SamplingParams(max_tokens=16, stop_ids={PROMPT[5]})),
    ]
    together = engine.run(reqs)
    alone = [engine.run([r])[0] for r in reqs]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [len(c.token_ids) for c in together][:3] == [12, 20, 7]


def test_generate_tokens_keeps_the_stop_id():
    model = _model()
    full = generate_tokens(model, PROMPT, 10)
    assert generate_tokens(model, PROMPT, 10, stop_ids={full[3]})[-1] == full[3]
    assert generate_tokens(model, PROMPT, 0) == []


def test_full_cache_is_a_clear_error():
    model = _model()
    cache = make_cache(model.config, 1, 8)
    with pytest.raises(ConfigError, match="KV cache is full"):
        prefill(model, cache, torch.tensor([PROMPT]))


def test_a_failing_row_ends_alone_and_the_batch_goes_on():
    """One request whose callback fails (a client gone wrong) ends with finish_reason 'error'; the others
    decoded in the same batch get exactly their solo completions."""
    model = _model()
    engine = Engine(model, ByteTokenizer(), max_batch=4)
    params = SamplingParams(max_tokens=10)

    def explode(delta):
        raise RuntimeError("client went away badly")

    outs = engine.run(
        [
            Request(list(b"one"), params),
            Request(list(b"two two"), params, on_delta=explode),
            Request(list(b"three"), params),
        ]  # fmt: skip
    )
    assert outs[1].finish_reason == "error" and "client went away" in outs[1].error
    for prompt, out in ((b"one", outs[0]), (b"three", outs[2])):
        assert out.token_ids == engine.generate(list(prompt), params).token_ids


def test_prefill_progress_timings_and_cached_tokens():
    """on_prefill sees each chunk of the prompt, the last call at its full length; a completion carries its
    batch's wall times, and how many prompt tokens the prompt cache supplied (0 without one, every whole
    chunk but the last on a repeat)."""
    model = _model()
    prompt = [(7 * i) % 256 for i in range(50)]
    params = SamplingParams(max_tokens=4)
    for cache_mb in (0, 64):
        engine = Engine(model, ByteTokenizer(), prefill_chunk=16, prompt_cache_mb=cache_mb, stop_at_eos=False)
        seen: list[tuple[int, int]] = []
        first = engine.generate(
            prompt, params, on_prefill=lambda done, total, seen=seen: seen.append((done, total))
        )
        assert seen == [(16, 50), (32, 50), (48, 50), (50, 50)]
        assert first.cached_tokens == 0 and first.prefill_seconds > 0 and first.decode_seconds > 0
        again = engine.generate(prompt, params)
        assert again.token_ids == first.token_ids
        assert again.cached_tokens == (48 if cache_mb else 0)


def test_a_failing_prefill_callback_fails_its_row_alone():
    model = _model()
    engine = Engine(model, ByteTokenizer(), max_batch=4, prefill_chunk=8)
    params = SamplingParams(max_tokens=6)

    def explode(done, total):
        raise RuntimeError("progress bar broke")

    outs = engine.run(
        [Request(list(b"one two three"), params), Request(list(b"four"), params, on_prefill=explode)]
    )
    assert (
        outs[1].finish_reason == "error" and "progress bar broke" in outs[1].error and not outs[1].token_ids
    )
    assert outs[0].token_ids == engine.generate(list(b"one two three"), params).token_ids
