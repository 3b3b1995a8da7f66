"""Helpers for the interop tests: tiny random Hugging Face models (built here, never downloaded) and a
quiet-load checker."""

from __future__ import annotations

import io
import logging
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

# per family: the config class and what makes the family itself tested (GQA everywhere; Mistral with an
# explicit head_dim != hidden/heads and a window longer than any test; Qwen2 with q/k/v bias and tying)
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "mistral": (
        "MistralConfig",
        dict(tie_word_embeddings=False, head_dim=32, sliding_window=4096, rope_theta=1e6),
    ),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
}

ORIGINAL = 32  # the "pretraining" length: every test input is longer
# rope type -> (HF rope parameters, max_position_embeddings)
ROPES = {
    "default": ({}, ORIGINAL),
    "linear": ({"factor": 4.0}, ORIGINAL),
    "dynamic": ({"factor": 2.0}, ORIGINAL),  # HF dynamic scales past max_position_embeddings
    "yarn": (
        {"factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 32.0, "beta_slow": 1.0},
        4 * ORIGINAL,
    ),
    "longrope": (
        {
            "factor": 4.0,
            "short_factor": [1.0, 1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0],
            "long_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
            "original_max_position_embeddings": ORIGINAL,
        },
        4 * ORIGINAL,
    ),
    "llama3": (
        {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
        },
        4 * ORIGINAL,
    ),
}


def hf_config(family: str, rope_type: str = "default", **overrides):
    cls_name, fam = FAMILIES[family]
    fam = dict(fam)
    rope, max_pos = ROPES[rope_type]
    theta = fam.pop("rope_theta")
    head_dim = fam.get("head_dim", 16)
    if rope_type == "longrope":  # one factor per rotary frequency
        rope = {
            **rope,
            "short_factor": rope["short_factor"][: head_dim // 2] * (head_dim // 16),
            "long_factor": rope["long_factor"][: head_dim // 2] * (head_dim // 16),
        }
    kw = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=300,
        max_position_embeddings=max_pos,
        initializer_range=0.1,
        rope_parameters={"rope_type": rope_type, "rope_theta": theta, **rope},
        **fam,
    )
    kw.update(overrides)
    return getattr(transformers, cls_name)(**kw)


def make_hf(
    path,
    family: str = "llama",
    rope_type: str = "default",
    *,
    dtype=torch.float32,
    max_shard_size=None,
    seed: int = 0,
    **overrides,
):
    """Build, save (safetensors) and return a random HF causal LM in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, rope_type, **overrides)).eval()
    model = model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kw)
    return model


def load_quietly(path):
    """AutoModelForCausalLM.from_pretrained(path) -> (model, complaints): every warning and every
    transformers log record at WARNING or above, plus missing/unexpected/mismatched keys."""
    from transformers.utils import logging as hf_logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    logger = hf_logging.get_logger()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), output_loading_info=True
            )
    finally:
        logger.removeHandler(handler)
    complaints = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    complaints += [line for line in stream.getvalue().splitlines() if line.strip()]
    complaints += [f"{k}: {v}" for k, v in info.items() if v]
    return model.eval(), complaints
