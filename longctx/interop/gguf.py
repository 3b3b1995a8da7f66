"""GGUF (llama.cpp, ollama, LM Studio) <-> longctx, as a pure adapter: metadata <-> GPTConfig, tensors <->
our state dict, the `tokenizer.ggml.*` vocabulary <-> a `tokenizers` tokenizer. `longctx.checkpoint` opens
and writes the files (with the `gguf` package, ggml's own reader, writer and (de)quantizers).

What llama.cpp's converter does that is undone here (and redone on export):
- names: `blk.{i}.attn_q` <-> `blocks.{i}.attn.q_proj`, `token_embd` <-> `tok_emb`, `output` <-> `lm_head`;
  a model whose file has no `output.weight` has tied embeddings;
- the llama architecture's Q and K rows are permuted (llama.cpp rotates adjacent pairs, HF and we rotate
  the two halves of a head): `unpermute` is the inverse of its `permute(w, n_head, n_head_kv)`. Qwen2
  uses the half layout in llama.cpp too (NEOX rope): no permutation;
- RoPE scaling lives in `{arch}.rope.scaling.*`: type (linear | yarn), factor, original context length,
  YaRN's betas, and an attention factor that llama.cpp multiplies into YaRN's own 0.1 ln s + 1.
Tokenizers: `gpt2` (byte-level BPE: tokens spelled in GPT-2's byte alphabet, merges) with the split regex
llama.cpp uses for its `pre` type, and `llama` (SentencePiece BPE: tokens with scores, byte fallback, merges
recovered from the scores as sentencepiece ranks them). Anything else is a one-line error naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from longctx.config import GPTConfig
from longctx.errors import CheckpointError, ConfigError

ARCHITECTURES = ("llama", "qwen2")  # what we read and write; Mistral files are written as llama
# ggml types we read (dequantized to fp32 by gguf.quants) and write
READ_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
OUT_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}

_LAYER = {
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "attn_norm",
    "ffn_norm": "mlp_norm",
}
_TOP = {"token_embd": "tok_emb", "output_norm": "norm", "output": "lm_head"}
_OURS_LAYER = {v: k for k, v in _LAYER.items()}
_OURS_TOP = {v: k for k, v in _TOP.items()}
# tensors llama.cpp writes that carry no weights of ours (precomputed RoPE tables)
_IGNORED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

# llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre` (src/llama-vocab.cpp); GPT-2's is the default
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_SPLITS: dict[str, list[str]] = {
    "default": [_GPT2_SPLIT],
    "gpt-2": [_GPT2_SPLIT],
    "gpt2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # digits one by one, then GPT-2's rule
    "llama3": [_LLAMA3_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
}
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


# -- names -----------------------------------------------------------------------------------------------
def our_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'blocks.3.attn.q_proj.weight'; None for tensors we do not hold."""
    if gguf_name in _IGNORED:
        return None
    base, _, leaf = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER:
        return f"blocks.{parts[1]}.{_LAYER[parts[2]]}.{leaf}"
    if base in _TOP:
        return f"{_TOP[base]}.{leaf}"
    raise CheckpointError(
        f"unexpected tensor {gguf_name!r} in the GGUF file: not part of a llama-family model"
    )


def gguf_name(ours: str) -> str:
    module, _, leaf = ours.rpartition(".")
    parts = module.split(".", 2)
    if parts[0] == "blocks" and len(parts) == 3 and parts[2] in _OURS_LAYER:
        return f"blk.{parts[1]}.{_OURS_LAYER[parts[2]]}.{leaf}"
    if module in _OURS_TOP:
        return f"{_OURS_TOP[module]}.{leaf}"
    raise ConfigError(f"weight {ours!r} has no GGUF equivalent")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row permutation of Q/K (per head: interleave the two halves into adjacent pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permuted_heads(name: str, config: GPTConfig) -> int | None:
    """How many heads llama.cpp permuted this tensor by (None: not permuted)."""
    if config.extra.get("gguf_architecture", "llama") != "llama":
        return None
    if ".attn.q_proj." in name:
        return config.n_head
    if ".attn.k_proj." in name:
        return config.n_kv_head
    return None


# -- config ----------------------------------------------------------------------------------------------
def architecture(meta: dict[str, Any]) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"GGUF architecture {arch!r} is not supported; longctx reads {', '.join(ARCHITECTURES)} "
            "(Llama 1/2/3, Mistral, SmolLM, Qwen2)"
        )
    return arch


def config_from_gguf(meta: dict[str, Any], tensor_names: Iterable[str]) -> GPTConfig:
    """GPTConfig from a GGUF file's metadata (and which tensors it has: a missing output.weight = tied)."""
    arch = architecture(meta)
    names = set(tensor_names)

    def key(name: str, default: Any = None, required: bool = True) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None and required:
            raise CheckpointError(f"the GGUF file lacks {arch}.{name}; it is not a complete {arch} model")
        return value

    n_head = int(key("attention.head_count"))
    d_model = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", d_model // n_head))
    rotary = int(key("rope.dimension_count", head_dim))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(key("vocab_size", len(tokens) if tokens else None))
    qkv_bias = "blk.0.attn_q.bias" in names
    return GPTConfig(
        vocab_size=vocab,
        n_layer=int(key("block_count")),
        n_head=n_head,
        n_kv_head=int(key("attention.head_count_kv", n_head)),
        d_model=d_model,
        d_ff=int(key("feed_forward_length")),
        head_dim=head_dim,
        mlp="swiglu",
        norm="rmsnorm",
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(key("context_length")),
        position="rope",
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_from_gguf(meta, arch),
        partial_rotary_factor=rotary / head_dim,
        qkv_bias=qkv_bias,
        extra={
            "gguf_architecture": arch,
            "gguf_name": meta.get("general.name"),
            **(
                {"chat_template": meta["tokenizer.chat_template"]}
                if "tokenizer.chat_template" in meta
                else {}
            ),
        },
    )


def _yarn_mscale(factor: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def _rope_from_gguf(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    p = f"{arch}.rope.scaling."
    kind = meta.get(p + "type", "none")
    factor = meta.get(p + "factor")
    if kind in ("none", None) or not factor or float(factor) == 1.0:
        return None
    factor = float(factor)
    orig = meta.get(p + "original_context_length") or meta.get(f"{arch}.context_length")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor, "original_max_position_embeddings": int(orig)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": int(orig)}
        scaling["beta_fast"] = float(meta.get(p + "yarn_beta_fast") or 32.0)
        scaling["beta_slow"] = float(meta.get(p + "yarn_beta_slow") or 1.0)
        attn = meta.get(p + "attn_factor") or meta.get(p + "yarn_attn_factor")
        if attn is not None and float(attn) != 1.0:  # llama.cpp multiplies it into YaRN's own mscale
            scaling["attention_factor"] = float(attn) * _yarn_mscale(factor)
        return scaling
    raise CheckpointError(f"GGUF rope scaling type {kind!r} is not supported; longctx reads linear and yarn")


def gguf_metadata(config: GPTConfig) -> tuple[str, dict[str, Any]]:
    """(architecture, {key suffix: value}) for a GGUF of `config`; refuses what llama.cpp cannot run."""
    problems = []
    if config.norm != "rmsnorm" or config.mlp != "swiglu" or config.position != "rope" or not config.causal:
        problems.append("a llama-shaped decoder (rmsnorm, swiglu, rope, causal)")
    if config.bias:
        problems.append("no biases (bias=True has no llama.cpp equivalent)")
    if config.context_method is not None:
        problems.append(
            "without a context method (llama.cpp reads none from the file; export the base model and use "
            "llama.cpp's own --grp-attn-n/--grp-attn-w for Self-Extend)"
        )
    if problems:
        raise ConfigError("cannot write GGUF: the model must be " + "; ".join(problems))
    arch = "qwen2" if config.qkv_bias else "llama"
    meta: dict[str, Any] = {
        "context_length": config.context_length,
        "embedding_length": config.d_model,
        "block_count": config.n_layer,
        "feed_forward_length": config.d_ff,
        "attention.head_count": config.n_head,
        "attention.head_count_kv": config.n_kv_head,
        "attention.key_length": config.head_dim,
        "attention.value_length": config.head_dim,
        "attention.layer_norm_rms_epsilon": config.norm_eps,
        "rope.freq_base": config.rope_theta,
        "rope.dimension_count": config.rotary_dim,
        "vocab_size": config.vocab_size,
    }
    meta.update(_rope_to_gguf(config))
    return arch, meta


def _rope_to_gguf(config: GPTConfig) -> dict[str, Any]:
    kind, s = config.rope_type, config.rope_scaling or {}
    if kind == "default":
        return {}
    orig = int(s.get("original_max_position_embeddings", config.max_seq_len))
    if kind == "ntk":  # fixed NTK-aware scaling is plain RoPE with a larger base
        dim = config.rotary_dim
        return {"rope.freq_base": config.rope_theta * float(s["factor"]) ** (dim / (dim - 2))}
    if kind == "linear":
        return {"rope.scaling.type": "linear", "rope.scaling.factor": float(s["factor"]),
                "rope.scaling.original_context_length": orig}  # fmt: skip
    if kind == "yarn":
        from longctx.positions.rope import yarn_rope

        factor = float(s["factor"])
        _, attention = yarn_rope(config)
        out = {
            "rope.scaling.type": "yarn",
            "rope.scaling.factor": factor,
            "rope.scaling.original_context_length": orig,
            "rope.scaling.yarn_beta_fast": float(s.get("beta_fast", 32.0)),
            "rope.scaling.yarn_beta_slow": float(s.get("beta_slow", 1.0)),
        }
        if not math.isclose(attention, _yarn_mscale(factor), rel_tol=1e-6):
            out["rope.scaling.attn_factor"] = attention / _yarn_mscale(factor)
        return out
    raise ConfigError(
        f"rope type {kind!r} cannot be written to GGUF (llama.cpp reads linear and yarn scaling; "
        "ntk is written as a larger rope base)"
    )


# -- tensors ---------------------------------------------------------------------------------------------
def tensor_from_gguf(name: str, array: np.ndarray, config: GPTConfig) -> tuple[str, torch.Tensor] | None:
    """One dequantized GGUF tensor (rows x columns as ggml stores them) -> (our name, tensor) or None."""
    ours = our_name(name)
    if ours is None or (ours == "lm_head.weight" and config.tie_embeddings):
        return None
    heads = permuted_heads(ours, config)
    if heads is not None:
        array = unpermute(array, heads)
    return ours, torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: the file is memory-mapped


def tensor_to_gguf(ours: str, tensor: torch.Tensor, config: GPTConfig) -> tuple[str, np.ndarray]:
    array = tensor.detach().to("cpu", torch.float32).numpy()
    cfg = config.replace(extra={**config.extra, "gguf_architecture": "qwen2" if config.qkv_bias else "llama"})
    heads = permuted_heads(ours, cfg)
    if heads is not None:
        array = _permute(array, heads)
    return gguf_name(ours), array


def storage_type(name: str, array: np.ndarray, outtype: str) -> str:
    """The ggml type a tensor is written in: norms and biases stay F32 (as llama.cpp's converter keeps
    them); a matrix takes `outtype` (Q8_0 where its rows split into blocks of 32, else F16)."""
    if outtype not in OUT_TYPES:
        raise ConfigError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUT_TYPES)}")
    if array.ndim < 2:
        return "F32"
    kind = OUT_TYPES[outtype]
    if kind == "Q8_0" and array.shape[-1] % 32:
        return "F16"
    return kind


# -- tokenizer -------------------------------------------------------------------------------------------
def tokenizer_from_gguf(meta: dict[str, Any]):
    """(tokenizers.Tokenizer, tokenizer_config dict) from `tokenizer.ggml.*`."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError("the GGUF file has no tokenizer (tokenizer.ggml.tokens); pass --tokenizer")
    types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if model == "gpt2":
        tok = _byte_level(tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre"))
    elif model == "llama":
        tok = _sentencepiece(
            tokens, meta.get("tokenizer.ggml.scores"), types, meta.get("tokenizer.ggml.merges")
        )
    else:
        raise CheckpointError(
            f"GGUF tokenizer model {model!r} is not supported; longctx reads gpt2 (byte-level BPE) and "
            "llama (SentencePiece)"
        )
    from tokenizers import AddedToken

    specials = [
        AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_CONTROL
    ]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_USER]
    tok.add_special_tokens(specials)
    tok.add_tokens(user)
    config: dict[str, Any] = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("unk", "unknown_token_id")):  # fmt: skip
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= int(i) < len(tokens):
            config[f"{role}_token"] = tokens[int(i)]
    for flag in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{flag}" in meta:
            config[flag] = bool(meta[f"tokenizer.ggml.{flag}"])
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, config


def _byte_level(tokens: list[str], merges: list[str], pre: str | None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    splits = PRE_SPLITS.get(pre or "default", PRE_SPLITS["default"])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens, ranked
    by the merged token's score (higher first), ties by the pieces' ids -- sentencepiece's own order."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in ids and right in ids:
                found.append((-score, ids[left], ids[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _sentencepiece(tokens: list[str], scores, types: list[int], merges):
    from tokenizers import Tokenizer, decoders, models, normalizers

    if scores is None and not merges:
        raise CheckpointError("the GGUF SentencePiece tokenizer has neither scores nor merges")
    pairs = [tuple(m.split(" ", 1)) for m in merges] if merges else spm_merges(tokens, list(scores))
    unk = next((t for t, k in zip(tokens, types) if k == TOKEN_UNKNOWN), None)
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=pairs,
            unk_token=unk,
            byte_fallback=True,
            fuse_unk=True,
        )  # fmt: skip
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def tokenizer_to_gguf(tokenizer) -> dict[str, Any]:
    """`tokenizer.ggml.*` for a byte-level BPE tokenizer (ours or a `tokenizer.json` one): tokens spelled in
    GPT-2's byte alphabet, merges, token types, special ids."""
    import json

    from longctx.data.tokenizer import ByteTokenizer, HFTokenizer, _bytes_to_unicode

    if isinstance(tokenizer, ByteTokenizer):
        alphabet = _bytes_to_unicode()
        from longctx.data.tokenizer import SPECIALS

        tokens = [alphabet[b] for b in range(256)] + list(SPECIALS)
        merges: list[str] = []
        types = [TOKEN_NORMAL] * 256 + [TOKEN_CONTROL] * len(SPECIALS)
    elif isinstance(tokenizer, HFTokenizer):
        spec = json.loads(tokenizer._tok.to_str())
        model = spec.get("model", {})
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            raise ConfigError(
                "only byte-level BPE tokenizers can be written to GGUF yet (this one is "
                f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''})"
            )
        vocab = tokenizer._tok.get_vocab(with_added_tokens=True)
        tokens = [""] * (max(vocab.values()) + 1)
        for t, i in vocab.items():
            tokens[i] = t
        added = {a["id"]: a for a in spec.get("added_tokens", [])}
        types = [TOKEN_CONTROL if added.get(i, {}).get("special") else TOKEN_USER if i in added else TOKEN_NORMAL
                 for i in range(len(tokens))]  # fmt: skip
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    else:
        raise ConfigError(f"cannot write a {type(tokenizer).__name__} tokenizer to GGUF")
    out: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_id,
        "tokenizer.ggml.add_bos_token": False,
    }
    if getattr(tokenizer, "bos_id", None) is not None:
        out["tokenizer.ggml.bos_token_id"] = tokenizer.bos_id
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        out["tokenizer.chat_template"] = template
    return out
