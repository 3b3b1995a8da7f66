"""Tokenizers: round trips (property tests), BPE training/reload, HF file interop, special-token lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from longctx.data.bpe import train_bpe
from longctx.data.tokenizer import SPECIALS, ByteTokenizer, HFTokenizer, load_tokenizer
from longctx.errors import CheckpointError, ConfigError, DataError

# st.text() draws from all of Unicode (no lone surrogates, which UTF-8 cannot encode)
any_text = st.text(max_size=200)


def no_special_strings(s: str) -> bool:
    return not any(name in s for name in SPECIALS)


@settings(max_examples=200, deadline=None)
@given(any_text)
def test_byte_tokenizer_round_trips(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # independent reference: the UTF-8 bytes
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids


@settings(max_examples=200, deadline=None)
@given(any_text)
def test_bpe_round_trips_any_unicode(bpe: HFTokenizer, text: str) -> None:
    # byte-level: text the tokenizer never saw (any script, emoji, control characters) still round-trips
    ids = bpe.encode(text, special_tokens=False)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(any_text.filter(no_special_strings))
def test_byte_tokenizer_json_matches_byte_ids(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    d = _byte_dir(tmp_path_factory)
    hf = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert hf.encode(text, add_special_tokens=False).ids == ByteTokenizer().encode(text)


_BYTE_DIR: dict[str, Path] = {}


def _byte_dir(factory: pytest.TempPathFactory) -> Path:
    if "d" not in _BYTE_DIR:  # hypothesis forbids function-scoped fixtures; save once per session
        d = factory.mktemp("byte_tok")
        ByteTokenizer().save(d)
        _BYTE_DIR["d"] = d
    return _BYTE_DIR["d"]


def test_byte_tokenizer_save_loads_back_as_byte(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    tok.save(tmp_path / "ck")
    assert isinstance(load_tokenizer(tmp_path / "ck"), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "ck" / "tokenizer.json"), ByteTokenizer)
    # read as a plain HF tokenizer, the specials land on the same ids
    hf = HFTokenizer.from_file(tmp_path / "ck" / "tokenizer.json")
    assert (hf.eos_id, hf.pad_id, hf.bos_id, hf.mask_id) == (tok.eos_id, tok.pad_id, tok.bos_id, tok.mask_id)
    assert hf.vocab_size == tok.vocab_size


def test_bpe_trains_saves_and_reloads(bpe_dir: Path, bpe: HFTokenizer, tmp_path: Path) -> None:
    # the tiny corpus runs out of pairs to merge before 400; specials + 256 bytes + some merges
    assert 256 + len(SPECIALS) < bpe.vocab_size <= 400
    assert [bpe.eos_id, bpe.pad_id, bpe.bos_id, bpe.mask_id] == [bpe.encode(s)[0] for s in SPECIALS]
    text = "the cat sat on a naïve mat 🎉\n    for i in range(10): return x = 1"
    ids = bpe.encode(text)
    assert len(ids) < len(text.encode())  # merges were learned
    for again in (load_tokenizer(bpe_dir), load_tokenizer(bpe_dir / "tokenizer.json")):
        assert isinstance(again, HFTokenizer)
        assert again.encode(text) == ids
        assert again.fingerprint() == bpe.fingerprint()
    bpe.save(tmp_path / "copy")
    assert HFTokenizer.from_file(tmp_path / "copy").encode(text) == ids
    cfg = json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())
    assert cfg["longctx_tokenizer"] == "hf" and cfg["eos_token"] == "<|endoftext|>"


def test_bpe_training_is_deterministic(tmp_path: Path, corpus_text) -> None:
    (tmp_path / "c.txt").write_text(corpus_text(300))
    a = train_bpe(str(tmp_path / "c.txt"), 300, show_progress=False)
    b = train_bpe(str(tmp_path / "c.txt"), 300, show_progress=False)
    assert a.fingerprint() == b.fingerprint()


def test_special_strings_parse_only_when_asked(bpe: HFTokenizer) -> None:
    text = "a<|endoftext|>b"
    assert bpe.eos_id in bpe.encode(text)
    plain = bpe.encode(text, special_tokens=False)
    assert bpe.eos_id not in plain and bpe.decode(plain) == text
    assert bpe.encode_batch([text, "x"], special_tokens=False) == [plain, bpe.encode("x")]


def _hf_checkpoint(tmp: Path, bpe: HFTokenizer, config: dict, rename: dict[str, str]) -> Path:
    """A folder like a Hugging Face checkpoint's: tokenizer.json with renamed specials + a config."""
    spec = json.loads(bpe._tok.to_str())
    for added in spec["added_tokens"]:
        added["content"] = rename.get(added["content"], added["content"])
    for old, new in rename.items():
        spec["model"]["vocab"][new] = spec["model"]["vocab"].pop(old)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "tokenizer.json").write_text(json.dumps(spec))
    if config:
        (tmp / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp


def test_hf_checkpoint_specials_from_config_dicts(bpe: HFTokenizer, tmp_path: Path) -> None:
    rename = {"<|endoftext|>": "</s>", "<|bos|>": "<s>", "<|pad|>": "<unk>", "<|mask|>": "<extra>"}
    template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "chat_template": template,
        "eos_token": {"content": "</s>", "lstrip": False, "normalized": False},
        "bos_token": "<s>",
        "pad_token": None,
    }
    d = _hf_checkpoint(tmp_path / "hf", bpe, cfg, rename)
    tok = load_tokenizer(d)
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == bpe.eos_id and tok.bos_id == bpe.bos_id
    assert tok.pad_id == tok.eos_id  # no pad token: pad with eos
    assert tok.mask_id is None
    assert tok.chat_template == template
    tok.save(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == template and saved["eos_token"] == "</s>"
    assert load_tokenizer(tmp_path / "out").chat_template == template


def test_hf_checkpoint_without_config_uses_well_known_names(bpe: HFTokenizer, tmp_path: Path) -> None:
    d = _hf_checkpoint(tmp_path / "hf", bpe, {}, {"<|endoftext|>": "<|im_end|>", "<|pad|>": "[PAD]"})
    tok = load_tokenizer(d / "tokenizer.json")
    assert tok.eos_id == bpe.eos_id and tok.pad_id == bpe.pad_id


def test_tokenizer_without_eos_is_rejected(bpe: HFTokenizer, tmp_path: Path) -> None:
    d = _hf_checkpoint(tmp_path / "hf", bpe, {}, {"<|endoftext|>": "<weird>"})
    with pytest.raises(CheckpointError, match="end-of-text"):
        load_tokenizer(d)


def test_bad_tokenizer_inputs(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizers file"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match="vocab_size"):
        train_bpe(None, 100)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(DataError, match="empty"):
        train_bpe(str(empty), 300, show_progress=False)
