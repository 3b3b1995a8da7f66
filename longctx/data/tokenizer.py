"""Tokenizers. Every one has the same small surface: encode, decode, vocab_size, eos_id, pad_id, save.

- `ByteTokenizer`: UTF-8 bytes 0..255 plus 4 specials (vocab 260); needs no training, fast (numpy).
- HF `tokenizers` BPE (trained on the user's corpus, or a checkpoint's `tokenizer.json`): see `bpe.py`.

A checkpoint directory stores `tokenizer.json` (Hugging Face format, loadable by transformers) and
`tokenizer_config.json`, whose `longctx_tokenizer` key says which class reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

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
    from longctx.data.bpe import HFTokenizer

    return HFTokenizer.from_file(tok_file)
