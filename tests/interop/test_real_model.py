"""The real pulled model (SmolLM2-135M-Instruct, `longctx pull smollm2-135m-instruct`): its logits equal
transformers' GGUF loader on the same file, it answers a chat question, and -- where llama-cpp-python is
installed (the `bench` extra) -- llama.cpp runs our GGUF export to the same greedy tokens, also extended
past the trained length with YaRN; Self-Extend's fused decode steps past the trained length give the
per-layer path's greedy tokens. Skipped, with the reason, when the model is not in the cache."""

from __future__ import annotations

import pytest
import torch

from longctx.catalogue import models_dir

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"
PULLED = models_dir() / NAME


@pytest.fixture(scope="module")
def pulled():
    if not (PULLED / "model.gguf").exists():
        pytest.skip(f"{NAME} is not in the cache ({PULLED}); run `longctx pull {NAME}`")
    return PULLED


def test_logits_equal_transformers_gguf_loader(pulled):
    transformers = pytest.importorskip("transformers")
    from longctx.checkpoint import load_model, load_tokenizer

    ours = load_model(pulled / "model.gguf")
    ids = torch.tensor(
        [load_tokenizer(pulled).encode("def fibonacci(n):\n    if n < 2:\n        return n\n" * 20)]
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(pulled), gguf_file="model.gguf", dtype=torch.float32
    )
    with torch.no_grad():
        want, got = hf.eval()(ids).logits, ours(ids)
        converted = load_model(pulled)(ids)  # the pulled longctx checkpoint: the same weights
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-5, rel
    torch.testing.assert_close(converted, got)


def test_greedy_chat_reply(pulled):
    from longctx.infer.chat import template_for
    from longctx.infer.engine import load_engine
    from longctx.infer.sampling import SamplingParams

    engine = load_engine(NAME, device="cpu")
    prompt = template_for(engine.config.extra, engine.tokenizer).render(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    reply = engine.generate(prompt, SamplingParams(max_tokens=24)).text
    assert "Paris" in reply, reply


@pytest.mark.parametrize("extend", [False, True])
def test_llama_cpp_runs_our_export_to_the_same_greedy_tokens(pulled, tmp_path, extend):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the bench extra) is not installed")
    from longctx.checkpoint import export_to_gguf, load_model, load_tokenizer
    from longctx.extend import ExtendArgs
    from longctx.extend import extend as run_extend
    from longctx.infer.engine import generate_tokens

    src = pulled
    n_prompt = 300
    if extend:  # YaRN x2 with no training, and a prompt past the original 8192 tokens
        run_extend(ExtendArgs.from_flat(ckpt=str(pulled), method="yarn", factor=2.0, seq_len=16384, steps=0,
                                        out=str(tmp_path / "yarn")))  # fmt: skip
        src, n_prompt = tmp_path / "yarn", 9000
    out = export_to_gguf(src, tmp_path / "m.gguf", outtype="f32")
    text = open(__file__).read()
    ids = load_tokenizer(src).encode(text * (n_prompt // 400 + 2))[:n_prompt]
    ours = generate_tokens(load_model(src), ids, 16)
    llm = llama_cpp.Llama(str(out), n_ctx=n_prompt + 32, n_threads=2, verbose=False, logits_all=False)
    theirs = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        theirs.append(tok)
        if len(theirs) == 16:
            break
    assert theirs == ours


def test_self_extend_fused_decode_equals_the_per_layer_path(pulled, monkeypatch):
    """Past the trained 8192 tokens with Self-Extend (factor 2): the one-call step over the rotated keys the
    cache keeps (`fused_decode`) and the model's own forward per layer (checked against a float64 reference
    at tiny size) choose the same 16 greedy tokens."""
    import longctx.infer.fused_decode as fused
    from longctx.data.sources import stdlib_files
    from longctx.infer.engine import EngineSpec, load_engine
    from longctx.infer.generate import forward_last, prefill

    spec = EngineSpec(prefill_chunk=1024, context_method={"name": "self-extend", "factor": 2.0})
    engine = load_engine(NAME, spec, "cpu", quiet=True)
    ids: list[int] = []
    for f in stdlib_files():
        ids += engine.tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= 8704:
            break
    prompt = torch.tensor([ids[:8704]])

    def greedy() -> list[int]:
        cache = engine.cache_for(1, prompt.shape[1] + 16)
        with torch.inference_mode():
            logits, out = prefill(engine.model, cache, prompt, 1024), []
            assert fused.why_not(engine.model, cache) is None  # the steps can run fused
            for _ in range(16):
                out.append(int(logits.argmax(-1)))
                logits = forward_last(engine.model, cache, torch.tensor([[out[-1]]]))
        return out

    got = greedy()
    monkeypatch.setattr(fused, "supports", lambda *a: False)  # now every step runs per layer
    assert got == greedy()
