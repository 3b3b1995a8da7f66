"""Prompt builders: the asked token length (+-1%) with the model's tokenizer, one needle at the asked depth."""

from __future__ import annotations

import pytest

from longctx.data import ByteTokenizer
from longctx.errors import ConfigError
from longctx.eval import niah, passkey, ruler


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A real subword tokenizer (byte-level BPE) trained on the built-in haystack: tokens of varying size."""
    from longctx.data.bpe import train_bpe

    return train_bpe(str(niah.HAYSTACK_FILE), 600, show_progress=False)


@pytest.fixture(params=["byte", "bpe"])
def tokenizer(request, bpe):
    return ByteTokenizer() if request.param == "byte" else bpe


# -- passkey ----------------------------------------------------------------------------------------
def test_passkey_template_is_the_references():
    text = passkey.passkey_text(20, 5, 4242)
    assert text.split("\n") == [
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.",
        "The g",  # filler[:p], sliced by characters from its start
        "The pass key is 4242. Remember it. 4242 is the pass key.",
        "The grass is gr",  # filler[:n-p] = 15 characters: again from the start
        "What is the pass key? The pass key is",
    ]
    assert passkey.filler(200).startswith(passkey.FILLER + " " + passkey.FILLER[:10])


@pytest.mark.parametrize("length", [400, 1500, 6000])
@pytest.mark.parametrize("depth", [0.0, 10.0, 50.0, 90.0, 100.0])
def test_passkey_prompt_length_and_depth(tokenizer, length, depth):
    key = 31337
    p = passkey.build_prompt(tokenizer, length, depth, key)
    n = len(tokenizer.encode(p.text))
    assert n == len(p.ids) and n <= length and n >= 0.99 * length
    line = passkey.key_line(key)
    assert p.text.count(line) == 1 and p.text.count(str(key)) == 2  # exactly one needle
    # the needle's position: the fraction of the filler characters that come before it
    start = len(passkey.PREAMBLE) + 1
    at = p.text.index("\n" + line)
    before = p.text[start:at]
    after = p.text[at + len(line) + 2 : p.text.rindex("\n" + passkey.QUESTION)]
    assert len(before) + len(after) == p.filler_chars
    assert len(before) / p.filler_chars == pytest.approx(depth / 100, abs=1 / p.filler_chars + 1e-9)


def test_passkey_scoring_first_integer_rule():
    assert passkey.is_correct(" 31337. Remember it.", 31337)
    assert passkey.is_correct("31337", 31337)
    assert passkey.is_correct(" 031337 is it", 31337)  # compared as integers, as the references do
    assert not passkey.is_correct(" 3133 7", 31337)
    assert not passkey.is_correct(" 12 then 31337", 31337)  # only the first integer counts
    assert not passkey.is_correct(" the pass key", 31337)
    assert passkey.first_integer("abc 12x34") == 12


def test_passkey_too_short_and_depth_parsing():
    with pytest.raises(ConfigError, match="does not fit"):
        passkey.build_prompt(ByteTokenizer(), 100, 50, 1)
    assert passkey.parse_depths("0,50,random") == [0.0, 50.0, "random"]
    with pytest.raises(ConfigError):
        passkey.parse_depths("120")


# -- needle in a haystack ---------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0.0, 35.0, 70.0, 100.0])
def test_niah_prompt(tokenizer, depth):
    hay = niah.load_haystack()
    length, gen = 3000, 40
    p = niah.build_prompt(tokenizer, hay, length, depth, gen)
    n = len(tokenizer.encode(p.text))
    assert n + gen <= length and n + gen >= 0.99 * length
    assert p.text.count(niah.NEEDLE.strip()) == 1
    at = p.text.index(niah.NEEDLE)
    context_start = len(niah.SYSTEM) + 2
    context_len = p.context_chars + len(niah.NEEDLE)
    if depth == 100.0:
        assert p.text[at + len(niah.NEEDLE) :].startswith("\n\n" + niah.QUESTION)
    else:
        assert at == context_start or p.text[at - 1] == "."  # a sentence boundary
        frac = (at - context_start) / context_len
        # moved back to the previous period: at most one sentence (< 400 characters here) before
        assert depth / 100 - 400 / context_len <= frac <= depth / 100 + 1e-9


def test_niah_scoring():
    assert niah.score_answer(" eat a sandwich and sit in Dolores Park on a sunny day.") == (1.0, 1.0)
    assert niah.score_answer("EAT a  sandwich and sit in dolores park on a sunny day!")[0] == 1.0
    score, recall = niah.score_answer(" eat a sandwich in the park")
    assert score == 0.0 and 0 < recall < 1


# -- RULER ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_ruler_prompt_fills_the_length(task):
    tok = ByteTokenizer()
    L = 12000
    s = ruler.build_sample(task, tok, L, seed=3)
    total = len(tok.encode(s.prompt)) + s.tokens_to_generate
    assert 0.99 * L <= total <= L
    assert s.answers and all(a in s.context for a in s.answers)
    if ruler.TASKS[task].family == "niah":
        assert all(s.prompt.count(n) == 1 for n in s.needles)


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multivalue", "vt", "cwe"])
def test_ruler_prompt_length_with_bpe(bpe, task):
    L = 4000
    s = ruler.build_sample(task, bpe, L, seed=1)
    total = len(bpe.encode(s.prompt)) + s.tokens_to_generate
    assert 0.99 * L <= total <= L


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_single_3"])
@pytest.mark.parametrize("depth", [10.0, 50.0, 90.0])
def test_ruler_single_needle_at_depth(task, depth):
    tok = ByteTokenizer()
    s = ruler.build_sample(task, tok, 12000, seed=0, depths=[depth])
    assert len(s.needles) == 1 and s.context.count("One of the special magic") == 1
    assert s.prompt.count(s.needles[0]) == 1
    frac = s.context.index(s.needles[0]) / len(s.context)
    assert frac == pytest.approx(depth / 100, abs=0.02)


def test_ruler_templates_and_wording():
    tok = ByteTokenizer()
    single = ruler.build_sample("niah_single_1", tok, 2000, seed=0)
    assert single.prompt.startswith("A special magic number is hidden within the following text.")
    assert single.prompt.endswith(" The special magic number for " + single.prompt.split(" for ")[-1])
    assert "mentioned in the provided text is" in single.prompt
    multi = ruler.build_sample("niah_multiquery", tok, 3000, seed=0)
    assert multi.prompt.startswith("Some special magic numbers are hidden")
    assert multi.prompt.endswith("mentioned in the provided text are") and len(multi.answers) == 4
    assert ", and " in multi.prompt.rsplit("What are all", 1)[1]
    vt = ruler.build_sample("vt", tok, 3000, seed=0)
    assert vt.prompt.count("Memorize and track the chain(s)") == 2  # the in-context example, then the task
    assert vt.prompt.endswith(", they are: ") and len(vt.answers) == 5
    chain_values = [line for line in vt.context.split("\n") if line.startswith("VAR ")]
    assert len(chain_values) == 5
    fwe = ruler.build_sample("fwe", tok, 3000, seed=0)
    words = fwe.context.split()
    counts = [words.count(w) for w in ["...", *fwe.answers]]
    assert counts == sorted(counts, reverse=True) and counts[-1] > 0
    cwe = ruler.build_sample("cwe", tok, 3000, seed=0)
    entries = cwe.context.split(" ")[1::2]
    assert all(entries.count(w) == 6 for w in cwe.answers)  # L < 4096: common words x6, others x1


def test_ruler_is_deterministic_given_seed():
    tok = ByteTokenizer()
    a = ruler.build_sample("niah_multikey_1", tok, 3000, seed=7, index=2)
    b = ruler.build_sample("niah_multikey_1", tok, 3000, seed=7, index=2)
    c = ruler.build_sample("niah_multikey_1", tok, 3000, seed=8, index=2)
    assert a.prompt == b.prompt and a.prompt != c.prompt
