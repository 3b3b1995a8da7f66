"""Imported Llama / Mistral / Qwen2 models compute what transformers computes, for every RoPE type, at
lengths past the original context: same logits (fp32, 1e-4) and the same 20 greedy tokens."""

from __future__ import annotations

import pytest
import torch
from interop_helpers import FAMILIES, ORIGINAL, ROPES, make_hf

from longctx.checkpoint import load_model
from longctx.positions.rope import ROPE_INIT_FUNCTIONS

PROMPT = ORIGINAL + 16  # longer than original_max_position_embeddings (and than max_position for dynamic)


@pytest.mark.parametrize("rope_type", list(ROPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_tokens_match_transformers(tmp_path, family, rope_type):
    if rope_type not in ROPE_INIT_FUNCTIONS:
        pytest.skip(f"rope type {rope_type} not in longctx.positions.rope yet")
    from longctx.infer.engine import generate_tokens

    hf = make_hf(tmp_path, family, rope_type)
    ours = load_model(tmp_path)  # the HF directory directly, as every command accepts it
    assert ours.config.rope_type == rope_type and ours.config.extra["hf_model_type"] == family

    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (2, PROMPT))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert expected.abs().max() > 1.0  # logits large enough for the tolerance to mean something

    prompt = ids[:1]
    eos = hf.generation_config.eos_token_id
    stop = {eos} if isinstance(eos, int) else set(eos or ())
    with torch.no_grad():
        if rope_type == "dynamic":
            # dynamic NTK changes every position's rotation as the sequence grows, so the hidden states of
            # earlier tokens change too and no KV cache (HF's, or ours that re-rotates cached keys) can be
            # exact: compare what the config means -- a full recompute per token -- on both sides
            hf_out = hf.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False, pad_token_id=0)
            ours_out = _greedy_without_cache(ours, prompt, 20, stop)
        else:
            hf_out = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
            ours_out = generate_tokens(ours, prompt[0].tolist(), 20, stop_ids=stop)
    assert ours_out == hf_out[0, PROMPT:].tolist()


def _greedy_without_cache(model, ids: torch.Tensor, n: int, stop: set[int]) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        nxt = int(model(ids)[0, -1].argmax())
        out.append(nxt)
        if nxt in stop:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out
