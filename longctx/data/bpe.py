"""Hugging Face `tokenizers` tokenizers: BPE trained on the user's corpus, or a checkpoint's tokenizer.json.

`HFTokenizer` has the same surface as `ByteTokenizer` (vocab_size, eos/pad/bos/mask ids, encode, decode,
save), so the rest of longctx never asks which kind it holds. `train_bpe` trains a byte-level BPE (GPT-2
style: any text round-trips, no unknown token) with the specials <|endoftext|>, <|pad|>, <|bos|>, <|mask|>.

Special strings: `encode` parses them in the text (so a chat template's <|im_start|> becomes one token),
while the corpus path (`encode_batch(..., special_tokens=False)`) treats them as plain text, so the only
eos ids in the token cache are the document separators longctx puts there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from longctx.data.tokenizer import SPECIALS, _write_config
from longctx.errors import CheckpointError, ConfigError, DataError

# Fallback names when tokenizer_config.json does not say, most common first (GPT-2/longctx, Llama/T5,
# Gemma, ChatML/Qwen, Llama 3, BERT).
WELL_KNOWN = {
    "eos": ["<|endoftext|>", "</s>", "<eos>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>", "[SEP]"],
    "bos": ["<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]"],
    "pad": ["<|pad|>", "<pad>", "[PAD]", "<|padding|>"],
    "mask": ["<|mask|>", "<mask>", "[MASK]"],
}
_ROLES = ("eos", "bos", "pad", "mask")


class HFTokenizer:
    """A `tokenizers.Tokenizer` behind longctx's tokenizer surface."""

    kind = "hf"

    def __init__(self, tok: Any, config: dict[str, Any] | None = None) -> None:
        from tokenizers import Tokenizer

        if not isinstance(tok, Tokenizer):
            raise TypeError(f"expected tokenizers.Tokenizer, got {type(tok).__name__}")
        self._tok = tok
        self._plain: Any = None  # a copy that reads special strings as text (built on first use)
        self._fingerprint: str | None = None
        config = config or {}
        vocab = tok.get_vocab(with_added_tokens=True)
        # added tokens may sit above the model's vocab, so the embedding must cover the largest id
        self.vocab_size = max(vocab.values()) + 1
        ids = {
            role: _special_id(tok, vocab, config.get(f"{role}_token"), WELL_KNOWN[role]) for role in _ROLES
        }
        if ids["eos"] is None:
            raise CheckpointError(
                "the tokenizer has no end-of-text token (eos_token in tokenizer_config.json "
                f"or one of {WELL_KNOWN['eos']}); longctx needs one as document separator"
            )
        self.eos_id: int = ids["eos"]
        self.pad_id: int = ids["pad"] if ids["pad"] is not None else self.eos_id  # no pad: pad with eos
        self.bos_id: int | None = ids["bos"]
        self.mask_id: int | None = ids["mask"]
        # kept verbatim (a Jinja string, or a list of named templates) and written back by save()
        self.chat_template: str | list | None = config.get("chat_template")

    # -- loading and saving -------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """A tokenizer.json (its folder's tokenizer_config.json / special_tokens_map.json name the specials),
        or a folder holding one (a longctx or Hugging Face checkpoint)."""
        from tokenizers import Tokenizer

        p = Path(path)
        tok_file = p / "tokenizer.json" if p.is_dir() else p
        if not tok_file.is_file():
            raise CheckpointError(
                f"no tokenizer.json at {path}; pass a tokenizer.json or a checkpoint folder"
            )
        try:
            tok = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises plain Exception for malformed JSON
            raise CheckpointError(f"{tok_file} is not a valid tokenizers file ({e})") from None
        return cls(tok, _read_config(tok_file.parent))

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))
        names = {role: self._name(getattr(self, f"{role}_id")) for role in _ROLES}
        extra = {"chat_template": self.chat_template} if self.chat_template is not None else None
        _write_config(d, self.kind, extra, **names)

    def _name(self, i: int | None) -> str | None:
        return None if i is None else self._tok.id_to_token(i)

    def fingerprint(self) -> str:
        """Hash of the full tokenizer definition: a different vocab or merges give a different token cache."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha1(self._tok.to_str().encode()).hexdigest()[:16]
        return self._fingerprint

    # -- encoding -----------------------------------------------------------------------------------------

    def encode(self, text: str, *, special_tokens: bool = True) -> list[int]:
        """Token ids, without a post-processor's BOS/EOS. `special_tokens=False`: "<|endoftext|>" in the
        text is ordinary text, not the eos id."""
        return self._encoder(special_tokens).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts at once, in parallel in the Rust library (the fast path for corpora)."""
        enc = self._encoder(special_tokens)
        fn = getattr(enc, "encode_batch_fast", enc.encode_batch)  # _fast (>=0.20) skips offsets
        return [e.ids for e in fn(list(texts), add_special_tokens=False)]

    def _encoder(self, special_tokens: bool) -> Any:
        if special_tokens:
            return self._tok
        if self._plain is None:
            from tokenizers import Tokenizer

            self._plain = Tokenizer.from_str(self._tok.to_str())
            self._plain.encode_special_tokens = True
        return self._plain

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_text(self, i: int) -> str:
        return self._tok.decode([int(i)], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"


def _read_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json, with special_tokens_map.json filling the special names it lacks."""
    cfg: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
        f = directory / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f} is not valid JSON ({e})") from None
        if isinstance(data, dict):
            cfg.update({k: v for k, v in data.items() if v is not None})
    return cfg


def _special_id(tok: Any, vocab: dict[str, int], configured: Any, fallbacks: list[str]) -> int | None:
    # HF configs write a special as "</s>" or as {"content": "</s>", "lstrip": false, ...}
    if isinstance(configured, dict):
        configured = configured.get("content")
    if isinstance(configured, str) and configured in vocab:
        return vocab[configured]
    for name in fallbacks:
        if name in vocab:
            return vocab[name]
    return None


def train_bpe(
    source: str | None,
    vocab_size: int,
    out_dir: str | Path | None = None,
    *,
    max_chars: int = 50_000_000,
    show_progress: bool = True,
) -> HFTokenizer:
    """Train a byte-level BPE on `source` (any `iter_documents` source; None = the stdlib corpus).

    Reads documents until `max_chars` characters (BPE merges settle long before a large corpus ends).
    Saves tokenizer.json + tokenizer_config.json to `out_dir` when given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(SPECIALS)
    if vocab_size <= minimum:
        raise ConfigError(
            f"BPE vocab_size must exceed {minimum} (256 bytes + {len(SPECIALS)} specials), "
            f"got {vocab_size}; use e.g. 8192 or 32000, or the byte tokenizer"
        )
    tok = Tokenizer(models.BPE())
    # GPT-2's byte-level scheme: text -> UTF-8 bytes -> printable stand-ins, split by its regex, so every
    # string is representable and decode(encode(s)) == s
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    seen = {"docs": 0}
    tok.train_from_iterator(_limited_texts(source, max_chars, seen), trainer)
    if seen["docs"] == 0:
        raise DataError(
            f"the corpus {source or 'stdlib'!r} is empty: no document has any text to train a tokenizer on"
        )
    eos, pad, bos, mask = SPECIALS
    out = HFTokenizer(tok, {"eos_token": eos, "pad_token": pad, "bos_token": bos, "mask_token": mask})
    if out_dir is not None:
        out.save(out_dir)
    return out


def _limited_texts(source: str | None, max_chars: int, seen: dict[str, int]) -> Iterator[str]:
    from longctx.data.sources import iter_documents

    total = 0
    for _, text in iter_documents(source):
        if not text.strip():
            continue
        yield text[: max_chars - total]
        seen["docs"] += 1
        total += len(text)
        if total >= max_chars:
            return
