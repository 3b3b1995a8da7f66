"""Masked-token batches (BERT's objective) for the bidirectional encoder: `longctx train --objective mlm`.

BERT (Devlin et al. 2019, §3.1 and appendix A.1) picks 15% of the tokens; of those, 80% become the mask
token, 10% a random token and 10% stay as they are; the loss is on the picked tokens only. As in
transformers' `DataCollatorForLanguageModeling`, every token is picked independently with probability 0.15
(so the share is 15% in expectation), and special tokens (end-of-text separators, padding) are never picked.
Random replacements are drawn from the non-special tokens.

The model must be bidirectional (`causal=False`): a causal model predicting a masked token from the left
only would be a worse CLM. `longctx train --objective mlm` sets `causal=False` on a new model and refuses
a causal checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch

from longctx.config import GPTConfig
from longctx.data.packing import IGNORE_INDEX
from longctx.data.tokenizer import Tokenizer
from longctx.errors import ConfigError

MASK_PROB = 0.15
MASK_TOKEN_SHARE = 0.8  # of the picked tokens: -> the mask token
RANDOM_TOKEN_SHARE = 0.1  # -> a random token; the remaining 10% keep their token
_RNG_TAG = 0x3A5  # separates the masking stream from the batch-sampling stream of the same (seed, step)


def mask_tokens(
    ids: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    special_ids: tuple[int, ...] = (),
    prob: float = MASK_PROB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) -> (inputs (B, T) with the 80/10/10 corruption, labels (B, T): the original token where
    picked, IGNORE_INDEX elsewhere)."""
    if not 0.0 < prob < 1.0:
        raise ConfigError(f"masking probability must be in (0, 1), got {prob}")
    probs = torch.full(ids.shape, prob)
    if special_ids:
        probs.masked_fill_(torch.isin(ids, torch.tensor(special_ids)), 0.0)
    picked = torch.bernoulli(probs, generator=generator).bool()  # (B, T)
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))
    u = torch.rand(ids.shape, generator=generator)  # one draw decides mask / random / keep
    to_mask = picked & (u < MASK_TOKEN_SHARE)
    to_random = picked & (u >= MASK_TOKEN_SHARE) & (u < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE)
    candidates = torch.arange(vocab_size)
    if special_ids:
        candidates = candidates[~torch.isin(candidates, torch.tensor(special_ids))]
    random_ids = candidates[torch.randint(len(candidates), ids.shape, generator=generator)]
    inputs = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, labels


def special_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    ids = (tokenizer.eos_id, tokenizer.pad_id, getattr(tokenizer, "bos_id", None), tokenizer.mask_id)
    return tuple(sorted({int(i) for i in ids if i is not None}))


def mlm_batch(
    batch: dict[str, torch.Tensor], tokenizer: Tokenizer, *, seed: int, step: int
) -> dict[str, torch.Tensor]:
    """A packed CLM batch (`sample_batch`) -> an MLM batch: the window itself, corrupted, with labels on
    the picked tokens (not shifted: position t predicts its own token). A pure function of (seed, step)."""
    if getattr(tokenizer, "mask_id", None) is None:
        raise ConfigError(
            "the tokenizer has no mask token, which --objective mlm needs; use the byte "
            "tokenizer or a BPE trained with the <|mask|> special"
        )
    g = torch.Generator().manual_seed(int(np.random.default_rng([seed, step, _RNG_TAG]).integers(2**62)))
    inputs, labels = mask_tokens(
        batch["input_ids"].cpu(),
        mask_id=tokenizer.mask_id,
        vocab_size=tokenizer.vocab_size,
        generator=g,
        special_ids=special_token_ids(tokenizer),
    )
    out = dict(batch)
    out["input_ids"], out["labels"] = inputs, labels
    return out


def require_encoder(config: GPTConfig) -> None:
    if config.causal:
        raise ConfigError(
            "--objective mlm trains a bidirectional encoder, but this model is causal; "
            "start a new model (--objective mlm sets causal=false) or pass --set causal=false"
        )
