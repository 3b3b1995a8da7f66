"""Perplexity versus context length, in the two ways the field computes it.

- **Sliding window** (Hugging Face, "Perplexity of fixed-length models"): a window of `length` tokens starts
  every `stride` tokens; only the tokens not scored by an earlier window are scored, and
  PPL = exp(sum NLL / number of scored tokens). stride = length gives disjoint windows.
- **Truncate** (YaRN `eval/perplexity.py --truncate`): every document with at least `length` tokens is cut to
  its first `length` tokens and scored as one window; shorter documents are skipped. All windows have the
  same length, so the token-weighted mean equals YaRN's mean of window losses.

In both, a window's first token has no context and is not scored in that window (as in HF, where labels shift
by one): with overlapping windows it was scored by an earlier one, with disjoint windows it is never scored.

Memory stays bounded at any length: the model returns hidden states (T, d) and the trainer's `chunked_nll`
forms logits `chunk_size` positions at a time, so no (T, V) logits tensor ever exists.

Several lengths at once (`perplexities`): a window that begins where a longer one began is that window's
prefix, and in a causal model whose positions do not depend on the sequence length (not dynamic NTK/YaRN
or LongRoPE) its tokens' losses are the longer window's first ones. So the longest lengths are scored first
and a shorter window that fits inside one already scored reads its losses from there: with one window per
length (the demo's 8K and 16K), the 8K costs nothing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from longctx.device import cpu_emulates
from longctx.errors import ConfigError, DataError
from longctx.eval.prompting import beyond_trained_length
from longctx.model import GPT
from longctx.train.loss import chunked_nll

DEFAULT_CHUNK = 1024  # positions per logits chunk: chunk x V floats at a time


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed to the model
    end: int  # one past the last token fed
    first_scored: int  # tokens [first_scored, end) are scored (absolute indices in the same array)


def sliding_windows(n_tokens: int, length: int, stride: int) -> Iterator[Window]:
    """The HF docs' loop: windows [begin, begin+length) every `stride`; targets are the tokens after the
    previous window's end (so each token is scored once), minus the window's first token."""
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + length, n_tokens)
        trg_len = end - prev_end  # HF: labels outside the last trg_len are -100
        yield Window(begin, end, max(end - trg_len, begin + 1))
        prev_end = end
        if end == n_tokens:
            break


def split_documents(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """Documents of a token stream whose documents are separated by `eos_id` (token_file's layout)."""
    cuts = np.flatnonzero(np.asarray(tokens) == eos_id)
    starts = np.concatenate([[0], cuts + 1])
    ends = np.concatenate([cuts, [len(tokens)]])
    return [tokens[s:e] for s, e in zip(starts, ends) if e > s]


@torch.no_grad()
def score_tokens(
    model: GPT,
    ids: torch.Tensor,
    first: int,
    chunk_size: int = DEFAULT_CHUNK,
    *,
    with_greedy: bool = False,
    feed_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ids: (T,) one window. -> (nll, greedy) for the targets ids[first:], each (T - first,):
    nll[i] = -log p(ids[first+i] | ids[:first+i]) (computed in at least float32, returned as float64 so
    sums over many windows keep their precision), greedy[i] = whether that token was the argmax (only with
    `with_greedy`, else None). feed_last: the window's last token is fed too, though its prediction is not
    needed (HF's perplexity loop: with positions that depend on the sequence length, as dynamic NTK's, the
    window's length sets every rotation); lm-eval's HFLM feeds all but the last.

    The cross-entropy is the trainer's `chunked_nll` (logits `chunk_size` positions at a time, at least
    float32), so evaluation and training compute the same loss."""
    if not 1 <= first <= ids.shape[0]:
        raise ConfigError(f"first scored position must be in [1, {ids.shape[0]}], got {first}")
    targets = ids[first:]  # (N,)
    if targets.numel() == 0:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool) if with_greedy else None
    hidden = model.hidden_states(ids[None] if feed_last else ids[None, :-1])[0]  # (T or T-1, d)
    pred, head = hidden[first - 1 : ids.shape[0] - 1], model.head_weight  # (N, d): position t predicts t+1
    if pred.device.type == "cpu" and cpu_emulates(pred.dtype):
        # the logits' GEMM on fp32 arithmetic where the CPU would emulate 16-bit ones, as the linears do
        # (`longctx.infer.decode_ops`): a 16-bit GEMM's products accumulated in fp32, without rounding the
        # logits to 16 bits (SmolLM2 in bf16, one 4096-token window, AVX2-only EPYC: 24.0 -> 10.8 s)
        pred, head = pred.float(), head.float()
    nll = chunked_nll(pred, head, targets, chunk_size).double()  # (N,)
    if not with_greedy:
        return nll, None
    greedy = torch.cat(
        [
            F.linear(pred[s : s + chunk_size], head).argmax(-1) == targets[s : s + chunk_size]
            for s in range(0, targets.shape[0], chunk_size)
        ]
    )  # (N,)
    return nll, greedy


# (id of the token array, window begin) -> (first scored, end, losses of tokens [first scored, end)); only
# within one `perplexities` call, which holds every array it keys so that no id is reused
Scored = dict[tuple[int, int], tuple[int, int, torch.Tensor]]


def _window_nll(
    model: GPT, tokens: np.ndarray, w: Window, chunk_size: int, scored: Scored | None
) -> tuple[torch.Tensor, bool]:
    """-> (losses of the window's scored tokens, whether they were read from a longer window scored before)."""
    key = (id(tokens), w.begin)
    if scored is not None and key in scored:
        first, end, nll = scored[key]
        if first <= w.first_scored and w.end <= end:
            return nll[w.first_scored - first : w.end - first], True
    device = model.head_weight.device
    ids = torch.as_tensor(np.asarray(tokens[w.begin : w.end], dtype=np.int64), device=device)
    nll, _ = score_tokens(model, ids, w.first_scored - w.begin, chunk_size)
    if scored is not None and (key not in scored or scored[key][1] < w.end):
        scored[key] = (w.first_scored, w.end, nll)
    return nll, False


def perplexity(
    model: GPT,
    tokens: np.ndarray | Sequence[int] | None,
    length: int,
    stride: int | None = None,
    truncate: bool = False,
    max_windows: int | None = None,
    docs: Sequence[np.ndarray] | None = None,
    *,
    eos_id: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
    return_windows: bool = False,
    scored: Scored | None = None,
) -> dict:
    """Perplexity of `model` at context `length`.

    tokens: 1-D token ids (a token_file memmap is fine). Sliding mode scores this stream; truncate mode
    splits it into documents at `eos_id` unless `docs` (a list of 1-D arrays) is given.
    stride: sliding step (default `length`: disjoint windows); must be in [1, length].
    max_windows: evaluate at most this many windows (the first ones; truncate: the first documents).
    scored: windows scored by earlier calls, to read prefixes from (`perplexities` passes it).
    Returns {"length", "mode", "stride", "ppl", "nll", "tokens", "windows", "shared_windows" (how many were
    read from a longer window), "beyond_trained_length", ...}.
    """
    if length < 2:
        raise ConfigError(f"length must be at least 2 tokens, got {length}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be positive, got {max_windows}")
    model.eval()
    if truncate:
        if docs is None:
            if tokens is None or eos_id is None:
                raise ConfigError(
                    "truncate mode needs document boundaries: pass docs=[...] or tokens "
                    "with eos_id (documents separated by the tokenizer's eos id)"
                )
            docs = split_documents(np.asarray(tokens), eos_id)
        long_docs = [d for d in docs if len(d) >= length]
        if not long_docs:
            longest = max((len(d) for d in docs), default=0)
            raise DataError(
                f"no document has {length} tokens (longest: {longest}); use sliding mode "
                "(drop --truncate) or data with longer documents"
            )
        result = {"mode": "truncate", "stride": None, "documents_too_short": len(docs) - len(long_docs)}
        jobs = [(d, Window(0, length, 1)) for d in long_docs[:max_windows]]
    else:
        if tokens is None:
            raise ConfigError("sliding mode needs a token stream (tokens=...)")
        stride = length if stride is None else stride
        if not 1 <= stride <= length:
            raise ConfigError(
                f"stride must be in [1, length={length}], got {stride}: a larger stride "
                "would leave tokens unscored"
            )
        n = len(tokens)
        if n < length:
            raise DataError(
                f"the data has only {n} tokens, fewer than one window of {length}; "
                "use more data or a shorter length"
            )
        windows = itertools.islice(sliding_windows(n, length, stride), max_windows)
        jobs = [(tokens, w) for w in windows]
        result = {"mode": "sliding", "stride": stride}
    nll_sum, count, shared, per_window = 0.0, 0, 0, []
    bar = tqdm(jobs, desc=f"ppl @ {length}", unit="win", disable=not progress, leave=False)
    for data, w in bar:
        nll, reused = _window_nll(model, data, w, chunk_size, scored)
        s, c = float(nll.sum()), int(nll.numel())
        nll_sum, count, shared = nll_sum + s, count + c, shared + reused
        if return_windows:
            per_window.append({"begin": w.begin, "end": w.end, "scored": c, "nll_sum": s})
        bar.set_postfix(ppl=f"{math.exp(nll_sum / max(count, 1)):.3f}")
    mean = nll_sum / count
    result.update(
        {
            "length": length,
            "ppl": math.exp(mean),
            "nll": mean,
            "tokens": count,
            "windows": len(jobs),
            "shared_windows": shared,
            "beyond_trained_length": beyond_trained_length(model, length),
        }
    )
    if return_windows:
        result["per_window"] = per_window
    return result


def perplexities(
    model: GPT,
    tokens: np.ndarray | Sequence[int] | None,
    lengths: Sequence[int],
    *,
    truncate: bool = False,
    docs: Sequence[np.ndarray] | None = None,
    eos_id: int | None = None,
    **kwargs,
) -> list[dict]:
    """`perplexity` at each of `lengths` (same keywords), shortest first in the result; the longest are
    scored first and shorter windows read from them where they are prefixes (module docstring). A model
    whose positions depend on the sequence length scores every window itself."""
    if truncate and docs is None and tokens is not None and eos_id is not None:
        docs = split_documents(np.asarray(tokens), eos_id)  # once: every length's windows key the same arrays
    scored: Scored | None = None if model.positions.length_dependent else {}
    out = {
        n: perplexity(model, tokens, n, truncate=truncate, docs=docs, eos_id=eos_id, scored=scored, **kwargs)
        for n in sorted(set(lengths), reverse=True)
    }
    return [out[n] for n in sorted(out)]
