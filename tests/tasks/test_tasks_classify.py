"""Classification: the head learns a separable task; the long-dependency task is solved with the whole
document and at chance when truncation cuts the key; pooling ignores padding; macro-F1; reload; CLI."""

import json
import random

import pytest
import torch

from longctx.checkpoint import save_checkpoint
from longctx.cli import main
from longctx.data.sources import read_jsonl
from longctx.data.synthetic_tasks import write_jsonl
from longctx.peft import apply_peft
from longctx.tasks import FinetuneArgs, PeftSpec, finetune, load_finetuned
from longctx.tasks.data import collate_classify
from longctx.tasks.finetune import macro_f1
from longctx.tasks.heads import ClassificationModel


def _args(ckpt, files, out, **kw) -> FinetuneArgs:
    base = dict(
        ckpt=ckpt,
        task="classify",
        data=files[0],
        eval=files[1],
        out=str(out),
        steps=30,
        lr=3e-3,
        batch_size=16,
        warmup=3,
        truncate="tail",
        device="cpu",
        quiet=True,
        peft=PeftSpec("none"),
    )
    return FinetuneArgs.from_flat(**{**base, **kw})


@pytest.mark.parametrize("causal", [True, False])
def test_head_learns_a_separable_toy_task(causal, decoder_ckpt, make_model, tmp_path):
    """Last-token head on the decoder, mean-pooled head on the bidirectional encoder."""
    ckpt = decoder_ckpt if causal else str(save_checkpoint(tmp_path / "enc", make_model(causal=False)))
    rng = random.Random(0)

    def record(label: int) -> dict:  # letters from the first or the second half of the alphabet
        letters = "abcdefghijklm" if label == 0 else "nopqrstuvwxyz"
        return {"text": "".join(rng.choice(letters) for _ in range(24)), "label": label}

    files = [write_jsonl([record(i % 2) for i in range(n)], tmp_path / f"{n}.jsonl") for n in (64, 32)]
    r = finetune(_args(ckpt, files, tmp_path / "out", steps=20))
    assert r.metrics["accuracy"] == 1.0 and r.metrics["macro_f1"] == 1.0
    assert r.history[-1]["loss"] < 0.3 * r.history[0]["loss"]


def test_long_dependency_needs_the_long_context(decoder_ckpt, key_files, tmp_path):
    """Documents of 64 characters whose first sentence decides the label: kept whole (max-len 64) the
    task is solved; with tail truncation to 16 tokens the key is gone and the score is chance."""
    long = finetune(_args(decoder_ckpt, key_files, tmp_path / "long", max_len=64))
    short = finetune(_args(decoder_ckpt, key_files, tmp_path / "short", max_len=16))
    assert long.metrics["truncated_share"] == 0.0 and short.metrics["truncated_share"] == 1.0
    assert long.metrics["accuracy"] >= 0.95
    assert short.metrics["accuracy"] <= 0.7  # balanced classes: a constant guess scores 0.5


def test_macro_f1_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = random.Random(1)
    for _ in range(20):
        t = [rng.randrange(4) for _ in range(30)]
        p = [rng.randrange(5) for _ in range(30)]  # predicts a class that never occurs too
        assert macro_f1(t, p) == pytest.approx(sklearn.f1_score(t, p, average="macro"), abs=1e-12)
    # by hand: class 0 F1 = 2*1/(2+0+1) = 2/3, class 1 F1 = 2*1/(2+1+0) = 2/3
    assert macro_f1([0, 0, 1], [0, 1, 1]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("causal,prefix", [(True, False), (False, False), (False, True)])
def test_pooling_ignores_padding(causal, prefix, make_model):
    """A batch of different lengths gives each row what it gives alone (last token for the decoder, the
    masked mean for the encoder, whose attention must not see the pads — but must see a learned prefix)."""
    backbone = make_model(causal=causal)
    if prefix:
        apply_peft(backbone, PeftSpec("prefix", prefix_len=3))
        for block in backbone.blocks:
            torch.nn.init.normal_(block.attn.prefix_v)
    model = ClassificationModel(backbone, 3).eval()
    assert model.pooling == ("last" if causal else "mean")
    ex = [type("E", (), {"ids": list(range(5, 5 + n)), "label": 0})() for n in (9, 4, 6)]
    batch = collate_classify(ex, pad_id=257)
    with torch.no_grad():
        together = model(batch["input_ids"], batch["lengths"])
        alone = torch.cat([model(torch.tensor([e.ids]), torch.tensor([len(e.ids)])) for e in ex])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_finetuned_directory_reloads_to_the_same_predictions(decoder_ckpt, key_files, tmp_path):
    r = finetune(_args(decoder_ckpt, key_files, tmp_path / "lora", steps=5, peft=PeftSpec("lora", lora_r=2)))
    out = r.out_dir
    assert {"finetune.json", "adapter.safetensors", "head.safetensors", "results.json", "merged"} <= {
        p.name for p in out.iterdir()
    }
    model, meta = load_finetuned(out)
    assert meta["labels"] == ["gold", "iron"] and meta["peft"]["method"] == "lora"
    recs = read_jsonl(key_files[1], {"text": (str,), "label": (str,)})[:4]
    ids = torch.tensor([list(rec["text"][-16:].encode()) for rec in recs])
    lengths = torch.full((4,), 16)
    r.model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, lengths), r.model(ids, lengths))
    results = json.loads((out / "results.json").read_text())
    assert results["trainable_parameters"] < results["total_parameters"] / 5


def test_cli_sweep_writes_table_results_and_plot(decoder_ckpt, key_files, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(
        [
            "finetune",
            decoder_ckpt,
            "--task",
            "classify",
            "--data",
            key_files[0],
            "--eval",
            key_files[1],
            "--out",
            str(out),
            "--peft",
            "none",
            "--truncate",
            "tail",
            "--sweep-len",
            "64,16",
            "--steps",
            "4",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "max_len" in text and "accuracy" in text
    summary = json.loads((out / "results.json").read_text())
    assert [r["max_len"] for r in summary["results"]] == [16, 64]
    assert (out / "sweep.png").stat().st_size > 1000
    assert (out / "len_16" / "results.json").exists() and (out / "len_64" / "merged").is_dir()


def test_cli_bad_input_is_one_line(decoder_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "abc"}\n')
    code = main(
        [
            "finetune",
            decoder_ckpt,
            "--task",
            "classify",
            "--data",
            str(bad),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "'label'" in err


def test_prefix_tuning_learns_a_separable_task(tmp_path, small_corpus, cache_dir):
    """`finetune --peft prefix` with its defaults learns "alpha ..." vs "omega ..." in 60 steps on a briefly
    trained tiny model (with the old 1e-3 the loss stayed at chance, ~0.69)."""
    import json

    from longctx.train.pretrain import TrainArgs, train

    base = tmp_path / "base"
    train(
        TrainArgs.from_flat(
            preset="tiny", data=small_corpus, cache_dir=cache_dir, seq_len=64, steps=20, out=str(base),
            quiet=True, eval_batches=1,
        )
    )  # fmt: skip
    rows = [{"text": " ".join([w] * 16), "label": w} for w in ("alpha", "omega") * 100]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(**kw):
        return finetune(
            FinetuneArgs.from_flat(
                ckpt=str(base), task="classify", data=str(data), out=str(tmp_path / "ft"),
                peft=PeftSpec("prefix"), steps=60, quiet=True, **kw,
            )
        )  # fmt: skip

    learned = run()
    assert learned.metrics["accuracy"] == 1.0
    assert learned.history[-1]["loss"] < 0.2
    assert run(lr=1e-3).history[-1]["loss"] > 0.5  # the old default: nothing learned in the budget
