"""Packing: positions restart after eos, batches are a pure function of (seed, step), labels shift by one."""

from __future__ import annotations

import numpy as np
import torch

from longctx.data.packing import document_positions, sample_batch, sequential_windows

EOS = 9


def _loop_positions(row: list[int], eos: int) -> list[int]:
    out, pos = [], 0
    for i in range(len(row)):
        if i > 0 and row[i - 1] == eos:
            pos = 0
        out.append(pos)
        pos += 1
    return out


def test_document_positions_match_python_loop() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (6, 50), generator=g)  # values 9 (eos) about 1 in 12
    ids[0, 0] = EOS  # eos first: the second token starts a document
    ids[1, -1] = EOS  # eos last: nothing after it
    ids[2] = EOS  # every token a separator
    got = document_positions(ids, EOS)
    want = torch.tensor([_loop_positions(r.tolist(), EOS) for r in ids])
    assert torch.equal(got, want)


def _tokens(n: int = 5000) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 12, size=n).astype(np.uint16)


def test_sample_batch_is_pure_in_seed_and_step() -> None:
    tokens = _tokens()
    a = sample_batch(tokens, 32, 4, seed=3, step=7)
    b = sample_batch(tokens, 32, 4, seed=3, step=7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], sample_batch(tokens, 32, 4, seed=3, step=8)["input_ids"])
    assert not torch.equal(a["input_ids"], sample_batch(tokens, 32, 4, seed=4, step=7)["input_ids"])


def test_rows_are_windows_with_labels_shifted_by_one() -> None:
    tokens = _tokens()
    batch = sample_batch(tokens, 32, 8, seed=0, step=0, eos_id=EOS, restart_positions=True)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (8, 32)
    for inp, lab, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
        row = torch.cat([inp, lab[-1:]])
        assert torch.equal(lab, row[1:])
        # the row is a contiguous window of the token stream
        starts = [o for o in range(len(tokens) - 32) if np.array_equal(tokens[o : o + 33], row.numpy())]
        assert starts
        assert pos.tolist() == _loop_positions(inp.tolist(), EOS)
    plain = sample_batch(tokens, 32, 2, seed=0, step=0)
    assert torch.equal(plain["position_ids"], torch.arange(32).expand(2, 32))


def test_sequential_windows_cover_the_stream_in_order() -> None:
    tokens = _tokens(100)
    wins = list(sequential_windows(tokens, 16))
    assert len(wins) == (100 - 1) // 16
    for i, (x, y) in enumerate(wins):
        assert x.tolist()[0] == tokens[i * 16 : (i + 1) * 16].tolist()
        assert y.tolist()[0] == tokens[i * 16 + 1 : (i + 1) * 16 + 1].tolist()
