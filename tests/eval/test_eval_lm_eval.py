"""The lm-evaluation-harness adapter on local tasks (no hub download). Skipped without lm-eval."""

from __future__ import annotations

import json
import math

import pytest
import torch

from longctx import GPT, GPTConfig
from longctx.checkpoint import save_checkpoint
from longctx.data import ByteTokenizer

lm_eval = pytest.importorskip("lm_eval")

MAX_LEN = 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=260, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=64, init_std=0.3)
    return str(save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", GPT(cfg)))


@pytest.fixture(scope="module")
def lm(ckpt):
    from lm_eval.api.registry import get_model

    import longctx.eval.lm_eval_adapter  # noqa: F401 - registers the model name

    return get_model("longctx").create_from_arg_string(f"ckpt={ckpt},device=cpu,max_length={MAX_LEN}")


@pytest.fixture(scope="module")
def model64(ckpt):
    from longctx.checkpoint import load_model

    return load_model(ckpt).double()


def logprob64(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) from full float64 logits (log_softmax, gather)."""
    ids = torch.tensor(context + continuation)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None, :-1])[0].double(), dim=-1)  # (T-1, V)
    n = len(continuation)
    rows = logp[-n:]
    target = ids[-n:]
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def _inst(request_type, args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=args, idx=0)


def test_loglikelihood_matches_float64(lm, model64):
    tok = ByteTokenizer()
    pairs = [("The grass is", " green"), ("", "The sky"), ("abc ", "def"), ("x" * 40, " y")]
    got = lm.loglikelihood([_inst("loglikelihood", p) for p in pairs], disable_tqdm=True)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        if ctx == "":
            c, t = [tok.eos_id], tok.encode(cont)
        else:  # lm-eval moves the context's trailing spaces onto the continuation
            n = len(ctx) - len(ctx.rstrip())
            c, t = tok.encode(ctx[: len(ctx) - n]), tok.encode(ctx[len(ctx) - n :] + cont)
        c = (c + t)[-(MAX_LEN + 1) :][: -len(t)]  # the context is cut from the left to fit max_length
        want, want_greedy = logprob64(model64, c, t)
        assert lp == pytest.approx(want, rel=1e-5) and greedy == want_greedy


def test_loglikelihood_rolling_covers_every_token(lm, model64):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = "The grass is green. The sky is blue. The sun is yellow."  # longer than max_length
    (got,) = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", (text,))], disable_tqdm=True)
    ids = ByteTokenizer().encode(text)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 256, MAX_LEN, 1)]
    assert sum(len(p) for _, p in windows) == len(ids)
    want = sum(logprob64(model64, c, p)[0] for c, p in windows)
    assert got == pytest.approx(want, rel=1e-5)


def test_generate_until_is_greedy_and_stops(lm, ckpt):
    from longctx.checkpoint import load_model
    from longctx.infer.engine import generate_tokens

    model, tok = load_model(ckpt), ByteTokenizer()
    (out,) = lm.generate_until(
        [_inst("generate_until", ("The sky", {"until": ["\n"], "max_gen_toks": 6}))], disable_tqdm=True
    )
    want = tok.decode([i for i in generate_tokens(model, tok.encode("The sky"), 6) if i < 256]).split("\n")[0]
    assert out == want


def _write_task(d, name, docs, body):
    data = d / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in docs) + "\n")
    (d / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\n{body}"
    )


def test_simple_evaluate_on_local_tasks(ckpt, model64, tmp_path, monkeypatch):
    """`lm_eval.simple_evaluate(model="longctx", ...)` on a multiple-choice and a generation task in YAML."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    mc = [
        {"q": "The grass is", "choices": ["green", "blue"], "gold": 0},
        {"q": "The sky is", "choices": ["yellow", "blue"], "gold": 1},
        {"q": "Here we", "choices": ["go", "stop", "are"], "gold": 0},
    ]
    _write_task(
        tmp_path,
        "longctx_local_mc",
        mc,
        'output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\nmetric_list:\n  - metric: acc\n',
    )
    gen = [{"q": "The sun is", "a": "yellow"}, {"q": "There and back", "a": "again"}]
    _write_task(
        tmp_path,
        "longctx_local_gen",
        gen,
        'output_type: generate_until\ndoc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 5\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
    )
    out = simple_evaluate(
        model="longctx",
        model_args=f"ckpt={ckpt},device=cpu,max_length={MAX_LEN}",
        tasks=["longctx_local_mc", "longctx_local_gen"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=False,
    )
    tok = ByteTokenizer()
    hits = 0
    for doc in mc:  # lm-eval scores " " + choice after the question; acc = argmax == gold
        scores = [logprob64(model64, tok.encode(doc["q"]), tok.encode(" " + c))[0] for c in doc["choices"]]
        hits += max(range(len(scores)), key=scores.__getitem__) == doc["gold"]
    assert out["results"]["longctx_local_mc"]["acc,none"] == pytest.approx(hits / len(mc))
    em = out["results"]["longctx_local_gen"]["exact_match,none"]
    assert 0.0 <= em <= 1.0 and not math.isnan(em)
