"""MLM: the 15% / 80-10-10 rule on a large sample, labels on picked tokens only, the encoder sees both
directions, `train --objective mlm` trains a bidirectional model with a falling masked-token loss."""

import dataclasses

import pytest
import torch

from longctx.data.masking import mask_tokens, mlm_batch, special_token_ids
from longctx.data.tokenizer import ByteTokenizer
from longctx.errors import ConfigError
from longctx.train.loss import IGNORE_INDEX
from longctx.train.pretrain import TrainArgs, train


def test_masking_follows_the_bert_rule():
    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (64, 2048), generator=g)  # 131072 tokens
    ids[:, ::50] = tok.eos_id  # separators in packed rows: never picked
    specials = special_token_ids(tok)
    inputs, labels = mask_tokens(
        ids,
        mask_id=tok.mask_id,
        vocab_size=tok.vocab_size,
        generator=torch.Generator().manual_seed(1),
        special_ids=specials,
    )
    picked = labels != IGNORE_INDEX
    eligible = ids != tok.eos_id
    assert not picked[~eligible].any()
    assert torch.equal(labels[picked], ids[picked])  # the label is the original token
    assert torch.equal(inputs[~picked], ids[~picked])  # unpicked tokens untouched
    n = picked.sum().item()
    share = n / eligible.sum().item()
    masked = (inputs[picked] == tok.mask_id).sum().item() / n
    kept = (inputs[picked] == ids[picked]).sum().item() / n
    randomised = 1 - masked - kept
    # binomial standard errors: ~0.001 for the 15%, ~0.002 for the shares of ~19600 picked tokens
    assert share == pytest.approx(0.15, abs=0.005)
    assert masked == pytest.approx(0.80, abs=0.01)
    assert randomised == pytest.approx(0.10 * 255 / 256, abs=0.008)  # a random draw may hit the original
    assert kept == pytest.approx(0.10 + 0.10 / 256, abs=0.008)
    rand = picked & (inputs != tok.mask_id) & (inputs != ids)
    assert not torch.isin(inputs[rand], torch.tensor(specials)).any()  # random replacements are real tokens


def test_mlm_batches_are_a_pure_function_of_seed_and_step():
    tok = ByteTokenizer()
    batch = {"input_ids": torch.randint(0, 256, (2, 64)), "labels": torch.zeros(2, 64, dtype=torch.long)}
    a, b = mlm_batch(batch, tok, seed=3, step=5), mlm_batch(batch, tok, seed=3, step=5)
    c = mlm_batch(batch, tok, seed=3, step=6)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])


@pytest.mark.parametrize("causal", [False, True])
def test_the_encoder_sees_both_directions(causal, make_model):
    model = make_model(causal=causal).eval()
    ids = torch.randint(0, 256, (1, 20))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256  # only the last token differs
    with torch.no_grad():
        h, h2 = model.hidden_states(ids), model.hidden_states(changed)
    first_moves = not torch.allclose(h[0, 0], h2[0, 0])
    assert first_moves == (not causal)


def test_train_objective_mlm(tmp_path, small_corpus, cache_dir):
    args = TrainArgs.from_flat(
        preset="tiny",
        data=small_corpus,
        cache_dir=cache_dir,
        seq_len=64,
        batch_size=8,
        steps=25,
        lr=3e-3,
        warmup=2,
        out=str(tmp_path / "mlm"),
        quiet=True,
        eval_batches=1,
        objective="mlm",
        config_overrides={"n_layer": 2, "d_model": 64, "n_head": 2, "d_ff": 128},
    )
    r = train(args)
    assert r.model.config.causal is False
    losses = [h["loss"] for h in r.history]
    assert losses[0] > 5.0  # ~ln(260): nothing known yet
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0]
    assert r.final_val_loss is not None and r.final_val_loss < 0.8 * losses[0]
    causal = dataclasses.replace(
        args,
        loop=dataclasses.replace(args.loop, out=str(tmp_path / "c")),
        config_overrides={**args.config_overrides, "causal": True},
    )
    with pytest.raises(ConfigError, match="bidirectional"):
        train(causal)


def test_train_command_accepts_objective(monkeypatch):
    from longctx.cli import build_parser
    from longctx.train.command import args_from_namespace

    monkeypatch.setattr("sys.argv", ["longctx", "train"])  # the parser configures the command in argv[1]
    ns = build_parser().parse_args(["train", "--objective", "mlm", "--steps", "3"])
    assert args_from_namespace(ns).objective == "mlm"
    with pytest.raises(ConfigError, match="objective"):
        TrainArgs(objective="xlm").validate()
