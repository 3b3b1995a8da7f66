"""Generation fine-tuning: no loss on prompt tokens (labels and gradients), end-to-end scores, refusals."""

import json

import pytest
import torch
import torch.nn.functional as F

from longctx.data.tokenizer import ByteTokenizer
from longctx.errors import ConfigError
from longctx.tasks import FinetuneArgs, PeftSpec, finetune
from longctx.tasks.data import collate_generate, generate_examples
from longctx.train.loss import lm_loss


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_prompt_tokens_get_no_loss_and_no_gradient(make_model):
    """The loss the fine-tuning uses has exactly the gradient of the mean cross-entropy over completion
    tokens, computed independently from full logits with positions chosen by hand."""
    tok = ByteTokenizer()
    recs = [
        {"prompt": "the quick brown fox", "completion": " jumps"},
        {"prompt": "hello", "completion": " world!"},
    ]
    ex = generate_examples(recs, tok, max_len=64, how="tail")
    batch = collate_generate(ex, tok.pad_id)
    model = make_model(seed=2)
    ours = _grads(model, lm_loss(model, batch, chunk_size=8))

    # reference: every (row, position) whose *next* token belongs to the completion (eos included)
    logits = model(batch["input_ids"])  # (B, T, V)
    nll = []
    for b, r in enumerate(recs):
        seq = tok.encode(r["prompt"] + r["completion"]) + [tok.eos_id]
        P = len(tok.encode(r["prompt"]))
        for t in range(P - 1, len(seq) - 1):
            nll.append(F.cross_entropy(logits[b, t], torch.tensor(seq[t + 1])))
    ref = _grads(model, torch.stack(nll).mean())
    for n in ours:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-4, atol=1e-7)

    # and the prompt positions would have changed it: the all-token loss has another gradient
    labels = batch["input_ids"].roll(-1, dims=1)
    every = _grads(model, lm_loss(model, {"input_ids": batch["input_ids"], "labels": labels}, chunk_size=8))
    assert any(not torch.allclose(every[n], ours[n], atol=1e-6) for n in ours)
    # the label tensor itself: prompt targets ignored
    P0 = len(ex[0].prompt)
    assert (batch["labels"][0, : P0 - 1] == -100).all() and (batch["labels"][0, P0 - 1 :] != -100).all()


def test_generate_finetune_scores_with_the_eval_metrics(decoder_ckpt, qa_files, tmp_path):
    args = FinetuneArgs.from_flat(
        ckpt=decoder_ckpt,
        task="generate",
        data=qa_files[0],
        eval=qa_files[1],
        out=str(tmp_path / "qa"),
        peft=PeftSpec("prefix", prefix_len=4),
        steps=3,
        lr=1e-2,
        batch_size=4,
        max_len=96,
        max_new_tokens=6,
        device="cpu",
        quiet=True,
    )
    r = finetune(args)
    assert {"bleu", "rouge1", "rouge2", "rougeL", "exact_match", "truncated_share"} <= set(r.metrics)
    assert 0.0 <= r.metrics["exact_match"] <= 1.0 and r.metrics["examples"] == 4
    assert r.history[-1]["loss"] < r.history[0]["loss"]
    results = json.loads((tmp_path / "qa" / "results.json").read_text())
    assert results["peft"] == "prefix" and not (tmp_path / "qa" / "merged").exists()  # prefix: no merge
    assert (tmp_path / "qa" / "adapter.safetensors").exists()


def test_generate_refuses_an_encoder(tmp_path, qa_files, make_model):
    from longctx.checkpoint import save_checkpoint

    enc = save_checkpoint(tmp_path / "enc", make_model(causal=False))
    with pytest.raises(ConfigError, match="causal decoder"):
        finetune(
            FinetuneArgs.from_flat(
                ckpt=str(enc),
                task="generate",
                data=qa_files[0],
                out=str(tmp_path / "o"),
                device="cpu",
                quiet=True,
                steps=1,
            )
        )
