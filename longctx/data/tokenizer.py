"""Tokenizers. Every one has the same small surface: encode, decode, vocab_size, eos_id, pad_id, save.

- `ByteTokenizer`: UTF-8 bytes 0..255 plus 4 specials (vocab 260); needs no training, fast (numpy).
- `HFTokenizer`: a Hugging Face `tokenizers` tokenizer (a checkpoint's `tokenizer.json`, or a BPE trained on
  the user's corpus by `longctx.data.bpe.train_bpe`). Special strings: `encode` parses them in the text (so
  a chat template's <|im_start|> becomes one token), while the corpus path (`encode_batch(...,
  special_tokens=False)`) treats them as plain text, so the only eos ids in the token cache are the
  document separators longctx puts there.

A checkpoint directory stores `tokenizer.json` (Hugging Face format, loadable by transformers) and
`tokenizer_config.json`, whose `longctx_tokenizer` key says which class reads it back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from longctx.errors import CheckpointError


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int  # also the document separator in packed training data
    pad_id: int
    bos_id: int | None
    mask_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...

    def save(self, directory: str | Path) -> None: ...


SPECIALS = ["<|endoftext|>", "<|pad|>", "<|bos|>", "<|mask|>"]


class ByteTokenizer:
    """Bytes are their own ids; specials sit at 256.. . Invalid UTF-8 in decode becomes U+FFFD."""

    kind = "byte"

    def __init__(self) -> None:
        self.vocab_size = 256 + len(SPECIALS)
        self.eos_id, self.pad_id, self.bos_id, self.mask_id = 256, 257, 258, 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_to_text(self, i: int) -> str:
        return SPECIALS[i - 256] if i >= 256 else bytes([i]).decode("latin-1")

    def save(self, directory: str | Path) -> None:
        """Write an equivalent HF tokenizer.json (byte-level, no merges) so other tools can read it."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers
        from tokenizers.pre_tokenizers import ByteLevel

        alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins HF uses for bytes
        byte_to_char = _bytes_to_unicode()
        vocab = {byte_to_char[b]: b for b in range(256)}
        assert set(vocab) == set(alphabet)
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(SPECIALS)
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tok.save(str(d / "tokenizer.json"))
        _write_config(d, "byte", eos="<|endoftext|>", pad="<|pad|>", bos="<|bos|>")


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map (the one HF's ByteLevel uses)
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _write_config(directory: Path, kind: str, extra: dict | None = None, **special: str | None) -> None:
    """tokenizer_config.json as transformers reads it; `extra` adds keys such as chat_template."""
    cfg = {
        "longctx_tokenizer": kind,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{k}_token": v for k, v in special.items() if v is not None},
        **(extra or {}),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """`None` or "byte" -> ByteTokenizer; a directory or a tokenizer.json -> the tokenizer stored there."""
    if path is None or str(path) == "byte":
        return ByteTokenizer()
    p = Path(path)
    directory = p if p.is_dir() else p.parent
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.exists():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None
        if cfg.get("longctx_tokenizer") == "byte":
            return ByteTokenizer()
    tok_file = p if p.is_file() else directory / "tokenizer.json"
    if not tok_file.exists():
        raise CheckpointError(
            f"no tokenizer at {path}: expected tokenizer.json (or use the byte tokenizer: --tokenizer byte)"
        )
    return HFTokenizer.from_file(tok_file)


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
