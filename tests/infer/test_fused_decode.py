"""The one-call decode step against the model's own forward (the per-op path) on the same cache: the same
hidden states and the same cached keys/values, for every weight format, cache dtype and layout it takes; and
the cases it must leave to the per-op path."""

import copy

import pytest
import torch

import longctx.infer.fused_decode as fused
from longctx import GPT, GPTConfig
from longctx.infer import quant
from longctx.infer.cache import make_cache
from longctx.infer.engine import Engine, EngineSpec
from longctx.infer.generate import prefill
from longctx.infer.sampling import SamplingParams
from longctx.kernels import available, unavailable_reason

pytestmark = pytest.mark.skipif(not available(), reason=f"native kernels: {unavailable_reason()}")
BASE = dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96, max_seq_len=128, init_std=0.3)


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny", **{**BASE, **kw})).eval()


@torch.no_grad()
def _compare(
    model: GPT, ref: GPT, kv: str = "auto", pads=(0,), steps: int = 5, tol: float = 2e-5, out_tol=None
):
    """Prefill both caches the same way, then decode `steps` tokens: fused on `model`, per-op on `ref`.
    out_tol: for the returned hidden states (a 16-bit model returns them in its dtype)."""
    out_tol = out_tol or tol
    B, L = len(pads), 20
    ids = torch.randint(0, model.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(1))
    caches = [make_cache(m.config, B, L + steps, kv_dtype=kv) for m in (model, ref)]
    for c in caches:
        if any(pads):
            c.pad = torch.tensor(pads)
        prefill(ref, c, ids, chunk=8)
    assert fused.why_not(model, caches[0]) is None
    tok = ids[:, -1:]
    for _ in range(steps):
        got = fused.step(model, caches[0], tok)
        caches[1].reserve(1)
        want = ref.hidden_states(tok, cache=caches[1])
        torch.testing.assert_close(got.float(), want.float(), rtol=out_tol, atol=out_tol)
        tok = (got[:, -1].float() @ ref.head_weight.float().T).argmax(-1, keepdim=True)
    n = caches[0].length
    assert n == caches[1].length == L + steps
    (k0, v0, scales0), (k1, v1, scales1) = (fused._storage(c) for c in caches)  # as stored
    for got, want in ((k0, k1), (v0, v1)):
        if kv == "int8":  # a 1-ulp difference in k or v may round to the next step: one at most, rarely
            diff = (got[..., :n, :].int() - want[..., :n, :].int()).abs()
            assert diff.max() <= 1 and diff.float().mean() < 1e-3
        else:
            torch.testing.assert_close(
                got[..., :n, :].float(), want[..., :n, :].float(), rtol=_rtol(model, got, tol), atol=tol
            )
    for got, want in zip(scales0, scales1):  # an int8 cache's scales
        torch.testing.assert_close(got[..., :n, :], want[..., :n, :], rtol=tol, atol=0)
    assert caches[0]._mapped.keys() == caches[1]._mapped.keys()  # a context method's rotated keys
    for name, (want, counts) in caches[1]._mapped.items():
        got, got_counts = caches[0].key_store(name)
        assert got_counts == counts == [n] * model.config.n_layer
        torch.testing.assert_close(
            got[..., :n, :].float(), want[..., :n, :].float(), rtol=_rtol(model, got, tol), atol=tol
        )


def _rtol(model: GPT, stored: torch.Tensor, tol: float) -> float:
    """`tol`, except for a context method's 16-bit cache: its merge order differs between the two paths and
    its keys are rotated by torch on one side and C on the other, so two fp32 values a few float errors apart
    may land either side of a rounding boundary and be stored one unit of the last place apart."""
    if model.config.context_method is None or stored.element_size() != 2:
        return tol
    return max(tol, torch.finfo(stored.dtype).eps)


CASES = {
    "gqa": {},
    "qkv bias, partial rotary": dict(qkv_bias=True, partial_rotary_factor=0.5),
    "yarn (static, attention factor)": dict(
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    ),
    "no positions": dict(position="none"),
    "multi-query": dict(n_kv_head=1),
}


@pytest.mark.parametrize("case", CASES)
def test_fp32_equals_per_op_path(case):
    model = _model(**CASES[case])
    _compare(model, model)


METHODS = {  # each past its window or first chunk by the 20 prompt tokens: every region has keys
    "self_extend": {"type": "self_extend", "group_size": 2, "window": 8},
    "rerope": {"type": "rerope", "window": 8},
    "leaky_rerope": {"type": "leaky_rerope", "window": 8, "leak": 4.0},
    "dual_chunk": {"type": "dual_chunk", "chunk_size": 12, "local_window": 3},
}


@pytest.mark.parametrize("kv", ["auto", "fp16", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_context_methods(method, kv):
    """A context method's step: raw keys into the cache, each key store's rotation of the new key, the
    regions' decode passes merged by logsumexp, as the per-op path computes them."""
    model = _model(context_method=METHODS[method])
    _compare(model, model, kv=kv, tol=2e-5 if kv == "auto" else 1e-4)


@pytest.mark.parametrize("kv", ["fp16", "bf16"])
def test_16_bit_caches(kv):
    model = _model()
    _compare(model, model, kv=kv, tol=1e-4)


def test_int8_cache():
    """Int8KVCache: the C side rounds new keys/values as its `quantize` does, and attends over the int8 values
    and scales where the per-op path dequantizes them first."""
    model = _model()
    _compare(model, model, kv="int8", tol=1e-4)


def test_padded_rows():
    model = _model()
    _compare(model, model, pads=(0, 5, 13))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_weights(fmt):
    # The kernels round activations to int16 steps of 2^-15 x the block max, so an upstream difference of
    # one float ulp (the two paths' RoPE round differently) can move an input across a step, and that
    # step's change grows through the layers: no tolerance bounds it. Without positions both paths feed
    # every kernel the same bits and must agree exactly; RoPE in the fused step is the fp32 tests' case.
    model = _model(position="none")
    quant.quantize_model(model, fmt)  # the per-op path runs the same QuantizedLinear modules
    _compare(model, model, tol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_equal_fp32_activations_on_the_same_weights(dtype):
    model = _model(qkv_bias=True).to(dtype)
    ref = copy.deepcopy(model).float()  # the same (rounded) weights, fp32 activations
    # every layer (the cached keys/values) within fp32 rounding; the output rounded to the model's dtype
    _compare(model, ref, tol=1e-4, out_tol=2**-7 if dtype == torch.bfloat16 else 2**-10)


@torch.no_grad()
def test_plan_follows_the_weights():
    model = _model()
    cache = make_cache(model.config, 1, 8)
    prefill(model, cache, torch.tensor([[1, 2, 3]]))
    fused.step(model, cache, torch.tensor([[4]]))
    first = model._longctx_fused_plan
    model.blocks[0].attn.q_proj.weight = torch.nn.Parameter(model.blocks[0].attn.q_proj.weight * 2)
    fused.step(model, cache, torch.tensor([[5]]))
    assert model._longctx_fused_plan is not first  # rebuilt: the old pointer would be stale


@torch.no_grad()
def test_what_it_leaves_to_the_per_op_path():
    from longctx.peft import PeftSpec, apply_peft

    model = _model()
    assert fused.why_not(model, make_cache(model.config, 1, 8, kv_dtype="int8")) is None  # fused too
    dyn = _model(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert "un-rotated" in fused.why_not(dyn, make_cache(dyn.config, 1, 8))
    alibi = _model(position="alibi")
    assert "alibi" in fused.why_not(alibi, make_cache(alibi.config, 1, 8))
    se = _model(context_method=METHODS["self_extend"])
    assert "not stored" in fused.why_not(se, make_cache(se.config, 1, 8))  # until a forward stored them
    assert "int8" in fused.why_not(se, make_cache(se.config, 1, 8, kv_dtype="int8"))
    padded = make_cache(se.config, 2, 8)
    padded.pad = torch.tensor([0, 3])
    assert "padded" in fused.why_not(se, padded)
    dyn_se = _model(
        context_method=METHODS["self_extend"], rope_scaling={"rope_type": "dynamic", "factor": 2.0}
    )
    assert "length-dependent" in fused.why_not(dyn_se, make_cache(dyn_se.config, 1, 8))
    lora = apply_peft(_model(), PeftSpec(method="lora")).eval()
    assert "lora" in fused.why_not(lora, make_cache(lora.config, 1, 8))
    assert fused.why_not(_model().train(), make_cache(lora.config, 1, 8)) == "the model is in training mode"


def test_engine_tokens_unchanged(monkeypatch):
    model, prompt = _model(), list(range(5, 30))
    params = SamplingParams(max_tokens=16)
    engine = Engine(model, None, EngineSpec(prefill_chunk=8, max_batch=4), stop_at_eos=False)
    prompts = [prompt, prompt[:11], prompt[3:]]
    got = [c.token_ids for c in engine.run([engine_request(p, params) for p in prompts])]
    monkeypatch.setattr(fused, "supports", lambda *a: False)
    want = [c.token_ids for c in engine.run([engine_request(p, params) for p in prompts])]
    assert got == want


def engine_request(p, params):
    from longctx.infer.engine import Request

    return Request(p, params)
