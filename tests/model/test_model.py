"""The decoder itself: causality, bidirectional mode, GQA, backends agree inside the model."""

import pytest
import torch

from longctx import GPT, GPTConfig
from longctx.errors import ConfigError


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, n_layer=2, n_head=4, d_model=32, max_seq_len=64, **kw)
    return GPT(cfg).eval()


@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "sinusoidal", "none"])
def test_changing_token_t_changes_no_logit_before_t(position):
    m = tiny(position=position)
    x = torch.randint(0, 50, (1, 40))
    y = x.clone()
    t = 25
    y[0, t] = (x[0, t] + 1) % 50
    a, b = m(x), m(y)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_bidirectional_mode_sees_the_future():
    m = tiny(causal=False)
    x = torch.randint(0, 50, (1, 40))
    y = x.clone()
    y[0, 30] = (x[0, 30] + 1) % 50
    assert not torch.allclose(m(x)[:, :30], m(y)[:, :30])


@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_chunked_backend_equals_sdpa_in_the_model(position, n_kv_head):
    m = tiny(position=position, n_kv_head=n_kv_head)
    x = torch.randint(0, 50, (2, 45))
    ref = m(x)
    m.config.attn_backend, m.config.attn_chunk_size = "chunked", 16
    out = m(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA with K heads == MHA whose key/value projections repeat each K head H/K times."""
    g = tiny(n_kv_head=2)
    cfg = g.config.replace(n_kv_head=4)
    m = GPT(cfg).eval()
    sd = g.state_dict()
    for i in range(cfg.n_layer):
        for name in ("k_proj", "v_proj"):
            w = sd[f"blocks.{i}.attn.{name}.weight"].view(2, 8, 32)
            sd[f"blocks.{i}.attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    m.load_state_dict(sd)
    x = torch.randint(0, 50, (1, 20))
    torch.testing.assert_close(m(x), g(x), rtol=1e-5, atol=1e-5)


def test_explicit_positions_shift_rope_consistently():
    """RoPE depends on relative positions only: shifting all positions by a constant leaves logits."""
    m = tiny(position="rope")
    x = torch.randint(0, 50, (1, 30))
    p = torch.arange(30)[None]
    torch.testing.assert_close(m(x, p), m(x, p + 17), rtol=1e-4, atol=1e-4)


def test_kv_cache_prefill_equals_full_forward():
    from longctx.infer.cache import KVCache

    for position in ("rope", "alibi", "learned"):
        m = tiny(position=position, n_kv_head=2)
        x = torch.randint(0, 50, (2, 33))
        cache = KVCache(m.config, 2, 40)
        parts = [m(x[:, :10], cache=cache), m(x[:, 10:11], cache=cache), m(x[:, 11:], cache=cache)]
        torch.testing.assert_close(torch.cat(parts, 1), m(x), rtol=1e-5, atol=1e-5)


def test_presets_sizes():
    sizes = {}
    for name in ("tiny", "small", "base"):
        with torch.device("meta"):
            sizes[name] = GPT(GPTConfig.from_preset(name)).num_parameters()
    assert 0.5e6 < sizes["tiny"] < 1.5e6
    assert 8e6 < sizes["small"] < 13e6
    assert 50e6 < sizes["base"] < 70e6
    base = GPTConfig.from_preset("base")
    assert (base.d_model, base.n_layer, base.n_head, base.d_ff, base.vocab_size) == (512, 8, 8, 1376, 32000)


@pytest.mark.parametrize(
    "bad,needle",
    [
        (dict(position="xpos"), "unknown position type"),
        (dict(n_head=3, d_model=32), "not divisible"),
        (dict(n_kv_head=3), "multiple of n_kv_head"),
        (dict(rope_scaling={"factor": 2.0}), "rope_type"),
        (
            dict(position="alibi", rope_scaling={"rope_type": "linear", "factor": 2.0}),
            "position is not 'rope'",
        ),
    ],
)
def test_config_validation_names_the_problem(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        GPTConfig(**{"n_head": 4, "d_model": 32, **bad})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        GPTConfig.from_preset("huge")


def test_config_json_round_trip(tmp_path):
    c = GPTConfig.from_preset("tiny", rope_scaling={"rope_type": "linear", "factor": 4.0})
    c.save(tmp_path / "config.json")
    assert GPTConfig.load(tmp_path / "config.json") == c


def test_concurrent_forwards_keep_their_own_key_masks_and_backends():
    """Two threads, one with padded rows of an encoder and one with S²-Attn handed in: each gets exactly
    what it gets alone (no setting leaks through global state)."""
    import threading

    from longctx.attention import KeyMask
    from longctx.extend.s2attn import s2_backend

    torch.manual_seed(0)
    enc = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, causal=False)).eval()
    dec = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=64))
    ids = torch.randint(0, 64, (2, 32))
    mask = KeyMask.from_lengths(torch.tensor([32, 20]), 32)
    s2 = s2_backend()
    want_enc = enc.hidden_states(ids, key_mask=mask).detach()
    want_dec = dec.hidden_states(ids, attention=s2).detach()  # grad on: sparse attention
    got, errors = {}, []

    def work(name, fn):
        try:
            for _ in range(20):
                got[name] = fn().detach()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=work, args=("enc", lambda: enc.hidden_states(ids, key_mask=mask))),
        threading.Thread(target=work, args=("dec", lambda: dec.hidden_states(ids, attention=s2))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    torch.testing.assert_close(got["enc"], want_enc)
    torch.testing.assert_close(got["dec"], want_dec)
    assert not torch.allclose(want_dec, dec.hidden_states(ids).detach(), atol=1e-4)  # S² really applied
