"""Self-Extend, ReRoPE, leaky ReRoPE and Dual Chunk Attention against a float64 reference written from the
papers' formulas (a relative distance per (query, key) pair, the full L x L matrix), on ragged lengths, GQA,
padded batches, and decoding step by step with the KV cache; inside the window / first chunk each equals
plain attention exactly."""

from __future__ import annotations

import math

import pytest
import torch

from longctx.attention import KeyMask, cpu_flash
from longctx.attention.context_methods import METHODS, ContextAttention
from longctx.config import GPTConfig
from longctx.errors import ConfigError
from longctx.infer.cache import KVCache, make_cache
from longctx.model import GPT
from longctx.positions.rope import RotaryPositions

SPECS = {
    "self_extend": {"type": "self_extend", "group_size": 3, "window": 8},
    "rerope": {"type": "rerope", "window": 8},
    "leaky_rerope": {"type": "leaky_rerope", "window": 8, "leak": 4.0},
    "dual_chunk": {"type": "dual_chunk", "chunk_size": 12, "local_window": 3},
}
L = 32  # the trained length the specs are checked against


def relative(method: dict, pi: int, pj: int) -> float:
    """The relative distance the method gives a (query at pi, key at pj) pair: the papers' definitions."""
    d = pi - pj
    if method["type"] == "self_extend":
        G, w = method["group_size"], method["window"]
        return d if d < w else (pi // G + w - w // G) - pj // G
    if method["type"] == "rerope":
        return min(d, method["window"])
    if method["type"] == "leaky_rerope":
        w = method["window"]
        return d if d < w else w + (d - w) / method["leak"]
    s, c = method["chunk_size"], method["chunk_size"] - method["local_window"]
    ci, cj = pi // c, pj // c
    if ci == cj:
        return pi % c - pj % c
    if ci == cj + 1:
        return min(pi % c + c, s) - pj % c
    return min(2 * c - 1, s) - pj % c


def reference(q, k, v, qp, kp, method, inv_freq, q_offset=0, visible=None):
    """float64: logit(i, j) = <R(rel(i, j)) q_i, k_j> / sqrt(hd), causal in slots, softmax, @ v."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, hd = q.shape
    Hk, S = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
    half = hd // 2
    theta = inv_freq.double()  # (hd/2,)
    out = torch.zeros(B, H, T, hd, dtype=torch.float64)
    for b in range(B):
        rel = torch.tensor([[relative(method, int(qp[b, i]), int(kp[b, j])) for j in range(S)] for i in range(T)],
                           dtype=torch.float64)  # fmt: skip
        ang = rel[..., None] * theta  # (T, S, hd/2)
        qa, qb = q[b, :, :, None, :half], q[b, :, :, None, half:]
        ka, kb = k[b, :, None, :, :half], k[b, :, None, :, half:]
        logit = ((qa * ka + qb * kb) * ang.cos() + (qa * kb - qb * ka) * ang.sin()).sum(-1) / math.sqrt(hd)
        allowed = torch.arange(S)[None, :] <= (q_offset + torch.arange(T))[:, None]
        if visible is not None:
            allowed = allowed & (
                visible[b][None, :] | (torch.arange(S)[None, :] == (q_offset + torch.arange(T))[:, None])
            )
        logit = logit.masked_fill(~allowed, -math.inf)
        out[b] = torch.softmax(logit, -1) @ v[b]
    return out


def _rotary(hd: int, **scaling):
    config = GPTConfig(vocab_size=16, n_layer=1, n_head=1, d_model=hd, max_seq_len=L, **scaling)
    return RotaryPositions(config)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize(("T", "H", "Hk", "hd"), [(45, 4, 2, 32), (70, 2, 2, 16), (23, 3, 1, 32)])
def test_matches_the_float64_reference(name, T, H, Hk, hd):
    g = torch.Generator().manual_seed(T + H)
    q, k, v = (
        torch.randn(1, H, T, hd, generator=g),
        torch.randn(1, Hk, T, hd, generator=g),
        torch.randn(1, Hk, T, hd, generator=g),
    )
    rot = _rotary(hd)
    method = ContextAttention(SPECS[name], rot.rotary, L)
    pos = torch.arange(T)[None]
    got = method(q, k, v, q_offset=0, q_pos=pos, k_pos=pos)  # the fast path where the kernels apply
    want = reference(q, k, v, pos, pos, SPECS[name], rot.inv_freq)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # the dense path (any device and dtype), forced by positions that are not the slots (same values)
    dense = method(q, k, v, q_offset=0, q_pos=pos.clone().float(), k_pos=pos.clone().float())
    torch.testing.assert_close(dense.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_takes_the_kernels_on_fp32_copies(name, dtype, monkeypatch):
    """bf16/fp16 inference runs the region passes on fp32 copies (not T x S dense scores): float64's answer
    on the same half-precision inputs within one rounding of the output (u = 2^-8 bf16, 2^-11 fp16)."""
    if not cpu_flash.available():
        pytest.skip("no native kernels (longctx.kernels.unavailable_reason())")
    g = torch.Generator().manual_seed(7)
    T, H, Hk, hd = 45, 4, 2, 32
    q, k, v = (torch.randn(1, h, T, hd, generator=g).to(dtype) for h in (H, Hk, Hk))
    rot = _rotary(hd)
    method = ContextAttention(SPECS[name], rot.rotary, L)
    monkeypatch.setattr(method, "_dense", lambda *a: pytest.fail("took the dense path"))
    monkeypatch.setattr(cpu_flash, "bf16_layout_ok", lambda *a, **kw: False)  # (as without the bf16 kernels)
    pos = torch.arange(T)[None]
    with torch.no_grad():
        got = method(q, k, v, q_offset=0, q_pos=pos, k_pos=pos)
    assert got.dtype == dtype
    want = reference(q, k, v, pos, pos, SPECS[name], rot.inv_freq)
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    torch.testing.assert_close(got.double(), want, rtol=u, atol=u * want.abs().max().item() + 1e-4)


@pytest.mark.parametrize("name", list(SPECS))
def test_bf16_takes_the_bf16_kernels_within_their_roundings(name, monkeypatch):
    """Where the bf16 kernels run, bf16 inference runs the region passes on them, no fp32 copy. Against
    float64 on the same bf16 q, k, v: each region's rotated q and k are rounded to bf16 once (rotation keeps
    norms, so a score moves by at most E_i = scale (2u + u^2) |q_i| max_j |k_j|, u = 2^-8), which moves each
    softmax weight by a factor within exp(+-2 E_i) and the output by at most (e^(2 E_i) - 1) (|o| + sum_j p_j
    |v_j|); then the kernels' own roundings (P before P V, the output: u (|o| + sum_j p_j |v_j|), their
    test in test_cpu_flash.py), and the merge's fp32 sums (1e-6)."""
    if not cpu_flash.bf16_kernels():
        pytest.skip("this CPU or build has no bf16 attention kernels (AVX512-BF16, no AMX)")
    g = torch.Generator().manual_seed(7)
    T, H, Hk, hd = 45, 4, 2, 32
    q, k, v = ((torch.randn(1, h, T, hd, generator=g) * 0.5).bfloat16() for h in (H, Hk, Hk))
    rot = _rotary(hd)
    method = ContextAttention(SPECS[name], rot.rotary, L)
    monkeypatch.setattr(method, "_dense", lambda *a: pytest.fail("took the dense path"))
    monkeypatch.setattr(cpu_flash, "flash_attention_cpu", lambda *a: pytest.fail("took the fp32 kernels"))
    pos = torch.arange(T)[None]
    with torch.no_grad():
        got = method(q, k, v, q_offset=0, q_pos=pos, k_pos=pos)
    assert got.dtype == torch.bfloat16
    want = reference(q, k, v, pos, pos, SPECS[name], rot.inv_freq)
    want_abs = reference(q, k, v.abs(), pos, pos, SPECS[name], rot.inv_freq)  # sum_j p_j |v_j|
    u, scale = 2.0**-8, hd**-0.5
    qn = q.double().norm(dim=-1)  # (1, H, T)
    E = scale * (2 * u + u * u) * qn * k.double().norm(dim=-1).max()
    bound = (torch.expm1(2 * E)[..., None] + u) * (want.abs() + want_abs) + 1e-6
    err = (got.double() - want).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max():.3g}"
    assert err.max() > 1e-4  # it did compute in bf16


@pytest.mark.parametrize("name", list(SPECS))
# a prefill chunk, a few queries, a decode step; with pad 46 the second row's 4 tokens are all inside the
# window of 8 while the first row's reach past it (its queries stay within its own tokens: T <= 4)
@pytest.mark.parametrize(("T", "pad"), [(20, 5), (3, 5), (1, 5), (3, 46), (1, 46)])
def test_padded_batch_and_cached_queries(name, T, pad, monkeypatch):
    """Two rows, the second left-padded (positions slot - pad); queries after 50 - T cached keys, on the
    native kernels' path where they are built."""
    g = torch.Generator().manual_seed(7)
    B, H, Hk, S, hd = 2, 4, 2, 50, 32
    q, k, v = (
        torch.randn(B, H, T, hd, generator=g),
        torch.randn(B, Hk, S, hd, generator=g),
        torch.randn(B, Hk, S, hd, generator=g),
    )
    mask = KeyMask.from_padding(torch.tensor([0, pad]), S)
    kpos = (torch.arange(S)[None] - torch.tensor([[0], [pad]])).clamp_min(0)
    qpos = kpos[:, S - T :]
    rot = _rotary(hd)
    method = ContextAttention(SPECS[name], rot.rotary, L)
    if cpu_flash.available():
        monkeypatch.setattr(method, "_dense", lambda *a: pytest.fail("took the dense path"))
    got = method(q, k, v, q_offset=S - T, q_pos=qpos, k_pos=kpos, key_mask=mask)
    want = reference(q, k, v, qpos, kpos, SPECS[name], rot.inv_freq, q_offset=S - T, visible=mask.visible)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def _model(spec=None, **kw) -> GPT:
    torch.manual_seed(0)
    base = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=L)
    config = GPTConfig(**{**base, **kw}, context_method=spec)
    return GPT(config).eval()


@pytest.mark.parametrize("name", list(SPECS))
def test_inside_the_window_it_is_plain_attention_exactly(name):
    plain, extended = _model(), _model(SPECS[name])
    span = SPECS[name].get("window") or SPECS[name]["chunk_size"] - SPECS[name]["local_window"]
    ids = torch.randint(0, 64, (2, span))
    with torch.no_grad():
        assert torch.equal(extended(ids), plain(ids))
        longer = torch.randint(0, 64, (1, 3 * L))
        assert not torch.allclose(extended(longer), plain(longer))  # past it the method changes something


# the relative error of one rounding of a stored key or value: fp32 none (the kernels' float error), fp16
# 2^-11, bf16 2^-8, int8 half a step of 127
ROUNDING = {"fp32": 1e-4, "fp16": 2.0**-11, "bf16": 2.0**-8, "int8": 0.5 / 127}


@pytest.mark.parametrize("kv", list(ROUNDING))
@pytest.mark.parametrize("name", list(SPECS))
def test_decoding_step_by_step_equals_one_forward(name, kv, monkeypatch):
    """A prefill chunk, then one token at a time, with each region's rotated keys kept in the cache
    (`KVCache.mapped_keys`): a step rotates its own key only, and where the kernels are built it is their
    decode pass per region (neither the chunked passes nor the dense path)."""
    model = _model(SPECS[name])
    ids = torch.randint(0, 64, (1, 60))
    with torch.no_grad():
        full = model(ids)
        cache = make_cache(model.config, 1, 60, kv_dtype=kv)
        steps = [model(ids[:, :25], cache=cache)[:, -1]]
        if cpu_flash.available():
            for path in ("_fast_row", "_dense"):
                monkeypatch.setattr(ContextAttention, path, lambda *a, p=path, **k: pytest.fail(f"took {p}"))
        for t in range(25, 60):
            steps.append(model(ids[:, t : t + 1], cache=cache)[:, -1])
            assert all(mapped == [t + 1] * 2 for _, mapped in cache._mapped.values())
    u = ROUNDING[kv]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 24:], rtol=u, atol=u * full.abs().max().item())


@pytest.mark.parametrize("name", list(SPECS))
def test_stored_keys_follow_rewrites_and_resets(name):
    """Slots written again (the cache rewound, as the prompt cache and speculative callers do), rows
    loaded, the cache reset: the stored rotations are redone where the keys changed."""
    model = _model(SPECS[name])
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 64, (1, 50), generator=g), torch.randint(0, 64, (1, 50), generator=g)
    with torch.no_grad():
        cache = KVCache(model.config, 1, 50)
        model(a[:, :40], cache=cache)
        cache.length = 30  # rewind: slots 30.. are rewritten with b's tokens
        rewound = [model(b[:, 30:45], cache=cache)[:, -1]] + [
            model(b[:, t : t + 1], cache=cache)[:, -1] for t in range(45, 50)
        ]
        fresh = model(torch.cat([a[:, :30], b[:, 30:]], 1))[:, 44:]
        torch.testing.assert_close(torch.stack(rewound, 1), fresh, rtol=1e-4, atol=1e-4)
        states = cache.row_states(0, 0, 50)
        cache.reset()
        model(b[:, :40], cache=cache)  # other keys everywhere, then a's states loaded back into the row
        cache.load_row(0, 0, states, 30)
        cache.length = 30
        again = model(b[:, 30:50], cache=cache)[:, -1]
        torch.testing.assert_close(again, fresh[:, -1], rtol=1e-4, atol=1e-4)


def test_stored_keys_cost_one_key_cache_per_key_map():
    """Self-Extend rotates keys two ways (near and grouped), Dual Chunk one way for its three regions."""
    for name, maps in (("self_extend", 2), ("dual_chunk", 1)):
        model = _model(SPECS[name])
        cache = KVCache(model.config, 1, 50)
        empty = cache.nbytes
        with torch.no_grad():
            model(torch.randint(0, 64, (1, 40)), cache=cache)
        assert len(cache._mapped) == maps and cache.nbytes == empty + maps * cache.k.nbytes


def test_engine_batches_equal_solo_runs():
    from longctx.data.tokenizer import ByteTokenizer
    from longctx.infer.engine import Engine, Request
    from longctx.infer.sampling import SamplingParams

    model = _model(SPECS["self_extend"], vocab_size=260)
    engine = Engine(model, ByteTokenizer(), max_batch=4)
    prompts = [list(b"a short one"), list(b"a much longer prompt than the window of eight")]
    params = SamplingParams(max_tokens=12)
    batched = engine.run([Request(p, params) for p in prompts])
    for p, out in zip(prompts, batched):
        assert out.token_ids == engine.generate(p, params).token_ids


def test_extended_window_and_bad_parameters():
    assert GPTConfig(max_seq_len=L, context_method=SPECS["self_extend"]).context_length == (L - 8) * 3 + 8
    for spec, needle in [
        ({"type": "self_extend", "group_size": 0, "window": 8}, "group_size"),
        ({"type": "self_extend", "group_size": 2, "window": L}, "shorter than the trained length"),
        ({"type": "self_extend", "group_size": 2, "window": 8, "size": 3}, "unknown"),
        ({"type": "warp", "window": 8}, "unknown context method"),
        ({"type": "dual_chunk", "chunk_size": 8, "local_window": 8}, "local_window"),
        ({"type": "rerope"}, "needs 'window'"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            GPTConfig(max_seq_len=L, context_method=spec)
    with pytest.raises(ConfigError, match="alibi"):
        GPTConfig(max_seq_len=L, position="alibi", context_method=SPECS["rerope"])
    assert set(METHODS) >= set(SPECS)


def test_extend_writes_the_method_and_every_stage_uses_it(tmp_path, capsys):
    from longctx.checkpoint import load_config, load_model, save_checkpoint
    from longctx.cli import main

    src = save_checkpoint(tmp_path / "base", _model(vocab_size=260))
    out = tmp_path / "se"
    assert main(["extend", str(src), "--method", "self-extend", "--seq-len", str(4 * L), "--steps", "0",
                 "--out", str(out), "--neighbor-window", "8"]) == 0  # fmt: skip
    config = load_config(out)
    assert config.context_method == {"type": "self_extend", "factor": 4.0, "window": 8, "group_size": 5}
    assert config.max_seq_len == L and config.context_length >= 4 * L
    ids = torch.randint(0, 260, (1, 3 * L))
    with torch.no_grad():  # the checkpoint and the run-time flag give the same model
        want = load_model(out)(ids)
        from longctx.infer.engine import EngineSpec, load_engine

        spec = EngineSpec(context_method={"name": "self-extend", "factor": 4.0, "window": 8})
        torch.testing.assert_close(load_engine(str(src), spec, "cpu").model(ids), want)
    assert main(["generate", str(src), "--prompt", "x" * 100, "--max-tokens", "3", "--context-method",
                 "rerope", "--neighbor-window", "8", "--context-factor", "4"]) == 0  # fmt: skip
    assert main(["eval", "passkey", str(src), "--lengths", "300", "--depths", "50", "--trials", "1",
                 "--context-method", "dual-chunk", "--out", str(tmp_path / "pk")]) == 0  # fmt: skip
    assert main(["convert", "to-hf", str(out), str(tmp_path / "hf")]) == 2
    assert "context_method" in capsys.readouterr().err
    assert main(["extend", str(src), "--method", "self-extend", "--seq-len", "64", "--steps", "0", "--out",
                 str(tmp_path / "bad"), "--group-size", "0"]) == 2  # fmt: skip
    assert main(["extend", str(src), "--method", "dual-chunk", "--seq-len", "64", "--steps", "0", "--out",
                 str(tmp_path / "bad"), "--dca-chunk-size", str(2 * L)]) == 2  # fmt: skip
    assert not (tmp_path / "bad").exists()
