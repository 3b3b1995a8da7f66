"""`train_bpe`: a byte-level BPE (GPT-2 style: any text round-trips, no unknown token) trained on the
user's corpus with the specials <|endoftext|>, <|pad|>, <|bos|>, <|mask|>, as an `HFTokenizer`
(`longctx.data.tokenizer`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from longctx.data.tokenizer import SPECIALS, HFTokenizer
from longctx.errors import ConfigError, DataError


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
