"""Language-model loss without the (N, V) logits: the LM head and cross-entropy computed in token chunks.

At 32K tokens and a 32000-token vocab the full fp32 logits are 4 GiB, and autograd keeps them (plus their
softmax) for the backward: more than the whole model's activations. `ChunkedLinearCrossEntropy` computes
logits one chunk of tokens at a time and turns each chunk's softmax into the gradients at once (the idea
of liger-kernel's fused linear cross-entropy, written with torch ops so it runs on any device). Peak extra
memory: one (chunk, V) block instead of (N, V); the matmul count is the plain path's.

Shapes: N tokens (batch and time flattened), d model width, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longctx.data.packing import IGNORE_INDEX
from longctx.errors import ConfigError
from longctx.kernels import fused
from longctx.train.memory import KeptGradient

__all__ = ["IGNORE_INDEX", "LossBuffers", "chunked_cross_entropy", "chunked_nll", "lm_loss"]
DEFAULT_CHUNK_SIZE = 1024


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    # logits/softmax in fp32 at least (bf16 hidden states), fp64 when the inputs are fp64 (reference checks)
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class LossBuffers:
    """The chunked loss's scratch tensors, kept from one call to the next by whoever owns one (a training
    objective: one per training loop, never shared by two losses at once). On CPU a tensor above glibc's
    32 MiB mmap limit is unmapped when freed and page-faulted in afresh when allocated again: for `base`
    (V = 32000) a chunk's bf16 logits, the head's bf16 copy and one chunk's bf16 grad_W are 131 MB, ~25 ms
    of faults a step on 2 AMD EPYC Zen 5 cores. The head's gradient handed out of the loss is kept too
    (`gradient`), reused only once nothing else holds it. A loss called without one allocates as before."""

    def __init__(self) -> None:
        self._kept: dict[str, torch.Tensor] = {}
        self._gradients: dict[str, KeptGradient] | None = {}

    def scratch_only(self) -> LossBuffers:
        """The same scratch tensors, with gradients handed out fresh: for a head tied to the embedding, whose
        two gradients autograd adds into a fresh tensor anyway (a kept one would only hold memory)."""
        view = LossBuffers()
        view._kept, view._gradients = self._kept, None
        return view

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """An uninitialised (shape) tensor, the one kept under `name` when it is large enough."""
        numel = math.prod(shape)
        t = self._kept.get(name)
        if t is None or t.dtype != dtype or t.device != device or t.numel() < numel:
            t = self._kept[name] = torch.empty(numel, dtype=dtype, device=device)
        return t[:numel].view(shape)

    def gradient(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """An uninitialised (shape) tensor to hand out as a parameter's gradient, kept under `name` across
        calls while nothing else holds it (`KeptGradient`). For `base` the head's fp32 gradient is 65 MB:
        fresh each step, its page faults and unmapping took 25-45 ms of a 0.6-0.7 s bf16 step at 1024
        tokens."""
        if self._gradients is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return self._gradients.setdefault(name, KeptGradient()).get(shape, dtype, device)


def _logit_buffer(
    hidden: torch.Tensor, weight: torch.Tensor, chunk: int, buffers: LossBuffers
) -> torch.Tensor | None:
    """One (chunk, V) buffer that every chunk's logits and log-softmax reuse, where that works: on CPU with
    no dtype change (no autocast). A fresh 100+ MB tensor per op costs more in page faults than the op itself
    (measured: logsumexp's internal subtraction 50 ms of a 1024 x 32000 chunk's 130 ms of softmax work; in
    place, 27 ms in all). None elsewhere (a GPU's caching allocator has no page faults to save)."""
    acc = _acc_dtype(hidden)
    if (
        hidden.device.type != "cpu"
        or not hidden.dtype == weight.dtype == acc
        or torch.is_autocast_enabled("cpu")
    ):
        return None
    return buffers.get("logits", (min(chunk, hidden.shape[0]), weight.shape[0]), acc, hidden.device)


def _chunk_log_probs(h: torch.Tensor, weight: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    """(n, d) x (V, d) -> log_softmax(h W^T) (n, V) in the accumulation dtype; into `buf` when given."""
    if buf is not None:
        logits = torch.mm(h, weight.t(), out=buf[: h.shape[0]])
        return torch.ops.aten._log_softmax.out(logits, -1, False, out=logits)  # row by row, in place
    return torch.log_softmax(F.linear(h, weight).to(_acc_dtype(h)), dim=-1)


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ConfigError(
            f"chunked loss wants hidden (N, d), weight (V, d), labels (N,); got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if hidden.shape[0] != labels.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ConfigError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if chunk_size <= 0:
        raise ConfigError(f"loss chunk_size must be a positive integer, got {chunk_size}")
    if labels.device.type == "cpu" and labels.numel():  # (on a GPU the check would sync)
        bad = (labels >= weight.shape[0]) | ((labels < 0) & (labels != IGNORE_INDEX))
        if bool(bad.any()):
            raise ConfigError(
                f"label {int(labels[bad][0])} is outside the vocabulary [0, {weight.shape[0]}) and is not "
                f"{IGNORE_INDEX} (ignored); check the tokenizer matches the model"
            )


def _chunk_nll(logp: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The chunk's summed -log p(label) over kept tokens: lse - target logit, from its log-softmax (n, V)."""
    nll = -logp.gather(1, y.clamp_min(0)[:, None]).squeeze(1)  # (n,)
    return torch.where(keep, nll, torch.zeros_like(nll)).sum()


def _dlogits_in_place(logp: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """d(lse - target)/dlogits = softmax - onehot, zero on ignored rows, computed in logp's memory. Ignored
    rows: on CPU zero just those rows (a pass over the whole (n, V) block costs ~15 ms a chunk); on a GPU
    finding them would sync, so the mask multiplies every row."""
    dlogits = logp.exp_()  # (n, V)
    dlogits[torch.arange(y.shape[0], device=y.device), y.clamp_min(0)] -= 1.0
    if dlogits.device.type != "cpu":
        dlogits *= keep.to(dlogits.dtype)[:, None]
    else:
        ignored = (~keep).nonzero().squeeze(1)
        if ignored.numel():
            dlogits.index_fill_(0, ignored, 0.0)
    return dlogits


def _softmax_step(
    logits: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's logits (n, V) -> (its summed nll over kept tokens, dlogits = softmax - onehot), the dlogits
    written over the logits. On CPU the native kernel does it in one pass per row (`fused.softmax_xent_`);
    elsewhere torch's log-softmax, gather and exp, in `scratch` (an fp32 (>= n, V) buffer) when the logits
    are bf16, rounded back into them at the end."""
    nll = fused.softmax_xent_(logits, y)
    if nll is not None:
        return nll.sum(), logits
    logp = logits if scratch is None else scratch[: logits.shape[0]].copy_(logits)
    torch.ops.aten._log_softmax.out(logp, -1, False, out=logp)  # row by row, in place
    total = _chunk_nll(logp, y, keep)
    dlogits = _dlogits_in_place(logp, y, keep)
    return total, (dlogits if scratch is None else logits.copy_(dlogits))


def _cpu_autocast_chunks(
    hidden, weight, labels, chunk_size: int, scale: float, need_h: bool, need_w: bool, buffers: LossBuffers
):
    """ChunkedLinearCrossEntropy's chunks under CPU autocast, with the arithmetic autocast would do (matmuls in
    its dtype, logits rounded to it, softmax and the sum of grad_W over chunks in fp32) but autocast off and
    every chunk's (chunk, V) tensors in buffers allocated once. Left to autocast, each chunk allocated six
    fresh 64-128 MB tensors (logits, their fp32 copy, log-softmax, dlogits' bf16 casts, a transposed one) and
    paid their page faults, and mixed-dtype ops (fp32 += bf16) ran ~5x slower than a copy_ and a same-dtype
    op. `base` at 4096 tokens, AMD EPYC Zen 5 (one profile each): the loss 2.59 s of a 4.8 s bf16 step before,
    0.91 s of 3.3 s after. The softmax step reads the bf16 logits and writes the bf16 dlogits in their place
    (`_softmax_step`): no fp32 (chunk, V) buffer where the native kernel runs.
    Returns (total, grad_h, grad_w) as the forward keeps them."""
    low, acc = torch.get_autocast_dtype("cpu"), _acc_dtype(hidden)
    (N, d), V = hidden.shape, weight.shape[0]
    n_max = min(chunk_size, N)
    with torch.autocast("cpu", enabled=False):
        cpu = hidden.device
        w_low = buffers.get("head", (V, d), low, cpu).copy_(weight)  # (V, d), cast once
        low_buf = buffers.get("logits", (n_max, V), low, cpu)  # a chunk's logits, then its dlogits, rounded
        # torch's softmax step works in fp32: a (chunk, V) buffer for it where the kernel cannot run
        scratch = None if fused.softmax_xent_runs(low_buf) else buffers.get("softmax", (n_max, V), acc, cpu)
        gw_low = buffers.get("grad_w", (V, d), low, cpu) if need_w else None  # one chunk's grad_W
        # a chunk's grad_W in fp32, to add to the sum (more than one chunk)
        gw_acc = buffers.get("grad_w_acc", (V, d), acc, cpu) if need_w and N > chunk_size else None
        grad_w = buffers.gradient("weight_grad", (V, d), acc, cpu) if need_w else None  # handed out
        grad_h, gh_low = (
            (torch.empty_like(hidden), buffers.get("grad_h", (n_max, d), low, cpu))
            if need_h
            else (None, None)
        )
        total = torch.zeros((), dtype=acc)
        for s in range(0, N, chunk_size):
            y = labels[s : s + chunk_size]  # (n,)
            n, keep = y.shape[0], y != IGNORE_INDEX
            h = hidden[s : s + chunk_size].to(low)  # (n, d)
            logits = torch.mm(h, w_low.t(), out=low_buf[:n])
            nll, d_low = _softmax_step(logits, y, keep, scratch)  # the scale goes into the matmuls (alpha)
            total += nll
            if need_h:
                torch.addmm(gh_low[:n], d_low, w_low, beta=0, alpha=scale, out=gh_low[:n])
                grad_h[s : s + chunk_size] = gh_low[:n]
            if need_w:
                torch.addmm(gw_low, d_low.t(), h, beta=0, alpha=scale, out=gw_low)
                if s == 0:
                    grad_w.copy_(gw_low)
                else:
                    grad_w += gw_acc.copy_(gw_low)
    return total, grad_h, (grad_w.to(weight.dtype) if need_w else None)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over non-ignored tokens of -log softmax(h W^T)[label], never holding more than (chunk, V) logits.

    The loss is the end of the graph, so its gradients w.r.t. h and W are known in the forward: each
    chunk's softmax is turned into gradients right away (grad_h = (softmax - onehot) W,
    grad_W += (softmax - onehot)^T h) and the backward only scales them by the upstream gradient. That
    costs the same three matmuls as the plain path, instead of the four of a recomputing backward, and
    keeps grad_h (N, d) and grad_W (V, d) -- the size of h and of W's own .grad -- instead of h.

    `scale` multiplies the loss and its gradients inside the matmuls (alpha), so a mean needs no pass of
    its own; and when the upstream gradient is exactly 1 (`loss.backward()` on this loss) the backward hands
    the stored gradients over as they are instead of multiplying 64+ MB by one."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk_size: int,
        scale: float,
        buffers: LossBuffers,
    ) -> torch.Tensor:
        acc = _acc_dtype(hidden)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if hidden.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            total, grad_h, grad_w = _cpu_autocast_chunks(
                hidden, weight, labels, chunk_size, scale, need_h, need_w, buffers
            )
            ctx.save_for_backward(grad_h, grad_w)
            return (total * scale).to(hidden.dtype)
        total = torch.zeros((), device=hidden.device, dtype=acc)
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, d), every row written below
        in_place = hidden.dtype == weight.dtype == acc and not torch.is_autocast_enabled(hidden.device.type)
        grad_w = None
        if need_w:  # (V, d); in place, the first chunk's matmul writes it whole (beta=0): no zero fill
            grad_w = (torch.empty if in_place else torch.zeros)(weight.shape, device=weight.device, dtype=acc)
        buf = _logit_buffer(hidden, weight, chunk_size, buffers)
        for s in range(0, hidden.shape[0], chunk_size):
            y = labels[s : s + chunk_size]  # (n,)
            keep = y != IGNORE_INDEX
            h = hidden[s : s + chunk_size]  # (n, d)
            logits = (
                torch.mm(h, weight.t(), out=buf[: h.shape[0]]) if buf is not None else F.linear(h, weight)
            )
            nll, dlogits = _softmax_step(logits.to(acc), y, keep)  # (n, V)
            total += nll
            if in_place:  # write / accumulate in place: no (n, d) or (V, d) temporaries
                if need_h:
                    gh = grad_h[s : s + chunk_size]
                    torch.addmm(gh, dlogits, weight, beta=0, alpha=scale, out=gh)
                if need_w:
                    torch.addmm(
                        grad_w, dlogits.transpose(0, 1), h, beta=0 if s == 0 else 1, alpha=scale, out=grad_w
                    )
            else:  # GPU autocast (bf16 matmuls) or mixed dtypes: out= and in-place ops would run in fp32
                if scale != 1.0:
                    dlogits *= scale
                if need_h:
                    grad_h[s : s + chunk_size] = (dlogits @ weight.to(acc)).to(hidden.dtype)
                if need_w:
                    grad_w += dlogits.transpose(0, 1) @ h.to(acc)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return (total * scale).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # the loss is linear in its upstream gradient: scale the gradients the forward already computed.
        # (Handing over the saved tensors is safe: autograd releases them after this call, and while a
        # retained graph still holds them it copies instead of taking them as a .grad.)
        if grad_out.device.type == "cpu" and float(grad_out) == 1.0:  # on a GPU the check would sync
            return grad_h, grad_w, None, None, None, None
        g_h = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        g_w = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return g_h, g_w, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    reduction: str = "mean",
    buffers: LossBuffers | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits = hidden @ weight^T against labels (IGNORE_INDEX skipped).

    hidden (N, d), weight (V, d), labels (N,). reduction "mean" (over non-ignored tokens) or "sum".
    chunk_size None -> the plain path (full logits, F.cross_entropy): the reference and the fast path
    for short sequences. `buffers`: scratch kept across calls (a training loop's), else fresh."""
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size is None:
        logits = F.linear(hidden, weight).to(_acc_dtype(hidden))  # (N, V)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction=reduction)
    _check(hidden, weight, labels, chunk_size)
    # mean over kept tokens; an all-ignored batch gives 0 (not NaN) so a step on it is a no-op
    count = (labels != IGNORE_INDEX).sum().clamp_min(1) if reduction == "mean" else None
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        # on CPU the mean's 1/count goes into the gradient matmuls; on a GPU reading count would sync
        scale = 1.0 / int(count) if count is not None and hidden.device.type == "cpu" else 1.0
        buffers = buffers if buffers is not None else LossBuffers()
        total = ChunkedLinearCrossEntropy.apply(hidden, weight, labels, int(chunk_size), scale, buffers)
        if scale != 1.0 or count is None:
            return total
    else:  # evaluation: no gradients to form (needs_input_grad would still say True under no_grad)
        total = chunked_nll(hidden, weight, labels, chunk_size).sum().to(hidden.dtype)
    if count is None:
        return total
    return total / count.to(total.dtype)


@torch.no_grad()
def chunked_nll(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Per-token negative log-likelihood (N,) without grad, never holding more than (chunk, V) logits.

    Ignored tokens (IGNORE_INDEX) get 0. For perplexity evaluation at long context."""
    _check(hidden, weight, labels, chunk_size)
    acc = _acc_dtype(hidden)
    out = torch.zeros(labels.shape, device=hidden.device, dtype=acc)  # (N,)
    buf = _logit_buffer(hidden, weight, chunk_size, LossBuffers())
    for s in range(0, hidden.shape[0], chunk_size):
        y = labels[s : s + chunk_size]
        logp = _chunk_log_probs(hidden[s : s + chunk_size], weight, buf)  # (n, V)
        nll = -logp.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
        out[s : s + chunk_size] = torch.where(y != IGNORE_INDEX, nll, torch.zeros_like(nll))
    return out


def lm_loss(
    model,
    batch: dict[str, torch.Tensor],
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    buffers: LossBuffers | None = None,
) -> torch.Tensor:
    """Mean next-token loss of `model` (a longctx GPT) on a batch.

    batch: input_ids (B, T), labels (B, T) already shifted (label t is the token after input t; -100 is
    ignored), optional position_ids (B, T), key_mask (a `KeyMask`) and attention (a backend for this forward,
    e.g. ring attention from a context-parallel step). chunk_size None -> full logits (F.cross_entropy).
    `buffers`: the loss's scratch kept across calls (`LossBuffers`: a training loop passes its own)."""
    hidden = model.hidden_states(
        batch["input_ids"],
        batch.get("position_ids"),
        key_mask=batch.get("key_mask"),
        attention=batch.get("attention"),
    )  # (B, T, d)
    labels = batch["labels"]
    if labels.shape != batch["input_ids"].shape:
        raise ConfigError(
            f"labels {tuple(labels.shape)} must have the shape of input_ids "
            f"{tuple(batch['input_ids'].shape)} (shifted by the packer, -100 where ignored)"
        )
    embedding = getattr(model, "tok_emb", None)
    if buffers is not None and getattr(embedding, "weight", None) is model.head_weight:
        buffers = buffers.scratch_only()  # a tied head: see LossBuffers.scratch_only
    return chunked_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        model.head_weight,
        labels.reshape(-1),
        chunk_size,
        buffers=buffers,
    )
