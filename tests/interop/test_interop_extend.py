"""`extend` run directly on a Hugging Face directory, exported back: transformers computes what longctx
computes with the new positions."""

from __future__ import annotations

import json

import pytest
import torch
from interop_helpers import ORIGINAL, load_quietly, make_hf

from longctx.checkpoint import export_to_hf, load_model
from longctx.data.tokenizer import ByteTokenizer

extend_mod = pytest.importorskip("longctx.extend")


def test_extend_an_hf_directory_and_export(tmp_path, small_corpus, cache_dir):
    src, ext, out = tmp_path / "hf", tmp_path / "ext", tmp_path / "hf-ext"
    make_hf(src, "llama", vocab_size=260)
    ByteTokenizer().save(src)  # the tokenizer the extension trains with
    seq_len = 4 * ORIGINAL
    r = extend_mod.extend(
        extend_mod.ExtendArgs.from_flat(
            ckpt=src, method="yarn", factor=4.0, seq_len=seq_len, steps=2, out=ext, lora=True,
            data=small_corpus, batch_size=2, cache_dir=cache_dir, quiet=True, eval_batches=1, warmup=1,
        )
    )  # fmt: skip
    export_to_hf(ext, out)

    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"] and hf_cfg["max_position_embeddings"] == seq_len
    assert hf_cfg["rope_parameters"]["rope_type"] == "yarn"
    assert hf_cfg["rope_parameters"]["original_max_position_embeddings"] == ORIGINAL
    hf, complaints = load_quietly(out)
    assert complaints == []
    ours = load_model(ext)
    ids = torch.randint(0, 260, (1, seq_len))
    with torch.no_grad():
        expected = ours(ids)
        torch.testing.assert_close(hf(ids).logits, expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(r.model.cpu()(ids), expected, rtol=0, atol=1e-4)
