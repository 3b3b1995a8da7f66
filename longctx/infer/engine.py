"""The generation engine used by `longctx generate`, the evaluations and the server, configured by one
`EngineSpec` (the same options on all three commands: `add_engine_arguments`).

    engine = Engine(model, tokenizer)                       # + sinks=4, window=N (StreamingLLM), kv_dtype="fp16"
    engine = Engine(model, tokenizer, EngineSpec(kv_dtype="fp16", prefill_chunk=1024))
    out = engine.generate("Once upon", SamplingParams(max_tokens=64, temperature=0.8, seed=0))
    outs = engine.run([Request(ids_a, params_a), Request(ids_b, params_b)])   # decoded together

Several requests are decoded as one batch: prompts are right-aligned in a shared cache (padding masked,
per-row positions, see `longctx.infer.generate`), every step feeds one token per live row, and rows that
finish leave the batch (`KVCache.select_rows`). Each request keeps its own sampling settings and seeded
generator, so a batch gives exactly what running its requests one by one gives.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from longctx.data.tokenizer import Tokenizer
from longctx.device import auto_dtype, cpu_emulates
from longctx.errors import ConfigError
from longctx.infer import decode_ops
from longctx.infer.cache import KVCache, check_kv_dtype, make_cache
from longctx.infer.generate import forward_last, prefill
from longctx.infer.prompt_cache import PromptCache
from longctx.infer.quant import check_format
from longctx.infer.sampling import SamplingParams, make_generator, sample_next
from longctx.model import GPT

DEFAULT_SINKS = 4
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the names torch and transformers use, accepted too
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class EngineSpec:
    """How a model generates. dtype: of the weights (the model is cast at load; auto = bf16 where the
    device runs it natively, else fp32: `longctx.device.native_bf16`); quantize: int8 / int4 weight-only
    quantization at load (`longctx.infer.quant`; fp32 activations, and `dtype` the prefill's arithmetic:
    fp32, or bf16 where the CPU runs it natively, auto = bf16 there); kv_dtype: what the KV cache
    stores (`make_cache`: auto = the model's dtype, bf16 for quantized weights; fp32, fp16, bf16, int8);
    sinks/window: StreamingLLM mode (either one turns it on; sinks default 4, window default the trained
    context minus the sinks); prefill_chunk: prompt tokens per forward; max_batch: rows decoded together;
    exact_dynamic: see Engine; prompt_cache_mb: memory for the states of recent prompts, reused by later
    prompts that share a prefix (`longctx.infer.prompt_cache`; exact; 0 = off; never in streaming mode).
    """

    dtype: str = "fp32"
    quantize: str | None = None
    kv_dtype: str = "auto"
    sinks: int | None = None
    window: int | None = None
    prefill_chunk: int = 512
    max_batch: int = 8
    exact_dynamic: bool = False
    stop_at_eos: bool = True
    prompt_cache_mb: int = 2048
    # a training-free context method applied at load: {"name": "self-extend", "factor": 4, "group_size": ...}
    context_method: dict | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _DTYPE_ALIASES.get(self.dtype, self.dtype))
        if self.dtype not in WEIGHT_DTYPES and self.dtype != "auto":
            raise ConfigError(
                f"unknown weight dtype {self.dtype!r}; choose auto or one of {', '.join(WEIGHT_DTYPES)}"
            )
        check_format(self.quantize)
        if self.quantize is not None and self.dtype not in ("fp32", "bf16", "auto"):
            raise ConfigError(
                f"--quantize {self.quantize} prefills in fp32 or bf16 arithmetic; use --dtype fp32, bf16 or auto"
            )
        check_kv_dtype(self.kv_dtype)  # an unknown one fails here, not mid-request
        if self.prefill_chunk < 1:
            raise ConfigError(f"--prefill-chunk must be at least 1, got {self.prefill_chunk}")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.prompt_cache_mb < 0:
            raise ConfigError(f"--prompt-cache-mb must be >= 0 (0 = off), got {self.prompt_cache_mb}")
        if self.sinks is not None and self.sinks < 0:
            raise ConfigError(f"--stream-sinks must be >= 0, got {self.sinks}")

    def resolved(self, device: torch.device) -> tuple[EngineSpec, str | None]:
        """-> (this spec with dtype auto decided for `device`, why it was decided so | None)."""
        if self.dtype != "auto":
            return self, None
        dtype, why = auto_dtype(device)
        return dataclasses.replace(self, dtype=dtype), why

    def prefill_dtype(self) -> torch.dtype:
        """Quantized weights' prefill arithmetic: bf16 where asked for and the CPU runs it natively (where it
        would emulate it, fp32 is the same numbers' faster route), else fp32."""
        low = self.quantize is not None and self.dtype == "bf16" and not cpu_emulates(torch.bfloat16)
        return torch.bfloat16 if low else torch.float32

    @property
    def torch_dtype(self) -> torch.dtype:
        return WEIGHT_DTYPES[self.dtype]


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    on_delta: Callable[[str], None] | None = None  # called with each new piece of text, as it is decided
    cancelled: Callable[[], bool] | None = None  # polled every step: True drops the request
    # called after each prefill chunk of the batch this request runs in: (prompt tokens done, to do)
    on_prefill: Callable[[int, int], None] | None = None


@dataclass
class Completion:
    token_ids: list[int]  # everything generated, a final stop token included
    text: str  # the text, stop strings and stop tokens excluded
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    error: str | None = None  # with finish_reason "error": what failed in this row alone
    cached_tokens: int = 0  # prompt tokens whose states came from the prompt cache (not recomputed)
    # wall time of the batch this request ran in: its prefill, and its decoding loop after it
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class TextStream:
    """Incremental detokenisation with stop strings: `push` token ids, get back the text that is safe to
    show — never half a UTF-8 character, never the start of what may become a stop string."""

    def __init__(self, tokenizer: Tokenizer | None, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.text = ""  # the decoded text so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids)
        hits = [i for i in (full.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = full[: min(hits)], True
            return self._emit(len(self.text))
        self.text = full
        safe = len(full.rstrip("\ufffd"))  # a trailing replacement char may be an unfinished character
        for s in self.stop:  # hold back a suffix that could grow into a stop string
            for k in range(min(len(s) - 1, safe - self.emitted), 0, -1):
                if full[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._emit(safe)

    def flush(self) -> str:
        """At the end: whatever was held back."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta


class _Row:
    """One request inside a batch: its settings, generator, tokens and text."""

    def __init__(self, req: Request, prompt_ids: list[int], stop_ids: set[int], tokenizer, device):
        self.req, self.params = req, req.params
        self.prompt_ids = prompt_ids
        self.stop_ids = stop_ids | self.params.stop_ids
        self.generator = make_generator(self.params.seed, device)
        self.new_ids: list[int] = []
        self.text = TextStream(tokenizer, self.params.stop)
        self.finish_reason: str | None = None
        self.error: str | None = None

    def step(self, logits: torch.Tensor) -> int | None:
        """logits (V,) -> the token to feed next, or None once this row is finished. A failure in this
        row (its sampling, its callbacks) finishes this row alone, with the error: the batch goes on."""
        if self.finish_reason is not None:  # failed before its first token (its prefill callback)
            return None
        try:
            return self._step(logits)
        except Exception as e:  # noqa: BLE001 - isolated to this request, reported in its completion
            self._fail(e)
            return None

    def progress(self, done: int, total: int) -> None:
        if self.req.on_prefill is None or self.finish_reason is not None:
            return
        try:
            self.req.on_prefill(done, total)
        except Exception as e:  # noqa: BLE001 - as in step: this row fails, the batch goes on
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        self.finish_reason, self.error = "error", f"{type(e).__name__}: {e}"

    def _step(self, logits: torch.Tensor) -> int | None:
        if self.req.cancelled is not None and self.req.cancelled():
            self.finish_reason = "cancelled"
            return None
        prev = None
        if self.params.repetition_penalty != 1.0:
            prev = torch.tensor(self.prompt_ids + self.new_ids, device=logits.device)
        tok = sample_next(
            logits,
            self.params,
            prev if prev is not None else logits.new_empty(0, dtype=torch.long),
            self.generator,
        )
        self.new_ids.append(tok)
        if tok in self.stop_ids:
            self.finish_reason = "stop"
        else:
            self._say(self.text.push(tok))
            if self.text.stopped:
                self.finish_reason = "stop"
            elif len(self.new_ids) >= self.params.max_tokens:
                self.finish_reason = "length"
        if self.finish_reason is not None:
            self._say(self.text.flush())
            return None
        return tok

    def _say(self, delta: str) -> None:
        if delta and self.req.on_delta is not None:
            self.req.on_delta(delta)

    def completion(self, cached_tokens: int, prefill_seconds: float, decode_seconds: float) -> Completion:
        return Completion(
            self.new_ids,
            self.text.text,
            self.finish_reason or "length",
            len(self.prompt_ids),
            self.error,
            cached_tokens,
            prefill_seconds,
            decode_seconds,
        )


class Engine:
    def __init__(
        self, model: GPT, tokenizer: Tokenizer | None = None, spec: EngineSpec | None = None, **options
    ):
        """spec: the configuration (EngineSpec); keyword options override its fields (`sinks=4`).
        The model is used as it is (dtype, device, eval mode: `load_engine` prepares it).

        exact_dynamic: for length-dependent RoPE (dynamic NTK/YaRN, LongRoPE), rebuild the cache whenever
        the frequencies for the new length differ from those it was filled under, so that decoding equals a
        full recompute at every step. Keys are always cached un-rotated and re-rotated on read (consistent
        bases, the #25104 fix), but the deeper layers' cached states still come from earlier frequencies;
        this mode removes that too. Cost: LongRoPE rebuilds once (when the length passes the original
        context), dynamic types at every step past it (quadratic, like no cache at all)."""
        spec = dataclasses.replace(spec or EngineSpec(), **options)
        self.spec, self.model, self.tokenizer = spec, model, tokenizer
        self.config = model.config
        self.streaming = spec.sinks is not None or spec.window is not None
        self.sinks = (DEFAULT_SINKS if spec.sinks is None else spec.sinks) if self.streaming else None
        self.window = spec.window if spec.window is not None else self.config.max_seq_len - (self.sinks or 0)
        if self.streaming and self.window < 1:
            raise ConfigError(f"streaming window must be at least 1 token, got {self.window}")
        self.kv_dtype, self.prefill_chunk, self.max_batch = spec.kv_dtype, spec.prefill_chunk, spec.max_batch
        if self.kv_dtype == "auto" and getattr(model, "quantized_head", None) is not None:
            # quantized weights (fp32 activations): a bf16 cache reads half the bytes of the fp32 one, which
            # at long contexts is most of a decode step, and rounds far less than the weights already did
            # (docs/infer.md: perplexity cost at noise level); bf16 rather than fp16: no overflow to fail on
            self.kv_dtype = "bf16"
        positions = model.positions
        self.exact_dynamic = spec.exact_dynamic and getattr(positions, "length_dependent", False)
        if self.exact_dynamic and self.streaming:
            raise ConfigError(
                "exact_dynamic rebuilds the whole cache; it cannot combine with a streaming window"
            )
        # streaming re-assigns positions as it evicts: a prompt's states depend on what came before it
        self.prompt_cache = (
            PromptCache(spec.prompt_cache_mb << 20, spec.prefill_chunk)
            if spec.prompt_cache_mb > 0 and not self.streaming
            else None
        )
        self.stop_ids = {tokenizer.eos_id} if (spec.stop_at_eos and tokenizer is not None) else set()
        ref = model.head_weight
        self.device, self.dtype = ref.device, ref.dtype

    # -- public ---------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        ids = list(prompt) if not isinstance(prompt, str) else self._tokenizer().encode(prompt)
        if not ids:
            bos = getattr(self.tokenizer, "bos_id", None)
            if bos is None:
                raise ConfigError("the prompt is empty and the tokenizer has no BOS token to start from")
            ids = [bos]
        return ids

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        on_delta: Callable[[str], None] | None = None,
        on_prefill: Callable[[int, int], None] | None = None,
    ) -> Completion:
        request = Request(self.encode(prompt), params or SamplingParams(), on_delta, on_prefill=on_prefill)
        return self.run([request])[0]

    @torch.inference_mode()
    def run(self, requests: list[Request]) -> list[Completion]:
        """Generate for every request; requests are batched (up to `max_batch` rows) where exact."""
        for r in requests:
            r.params.validate()
            if r.params.stop and self.tokenizer is None:
                raise ConfigError("stop strings need a tokenizer; pass one to Engine")
            self._check_length(len(self.encode(r.prompt_ids)), r.params.max_tokens)
        out: list[Completion | None] = [None] * len(requests)
        for group in self._groups(requests):
            for i, c in zip(group, self._run_group([requests[i] for i in group])):
                out[i] = c
        return out  # type: ignore[return-value]

    def cache_for(self, batch_size: int, tokens: int) -> KVCache:
        """The cache one generation of `tokens` total tokens (prompt + new) uses."""
        max_len = self.sinks + self.window if self.streaming else tokens
        return make_cache(
            self.config,
            batch_size,
            max_len,
            device=self.device,
            dtype=self.dtype,
            sinks=self.sinks,
            kv_dtype=self.kv_dtype,
        )

    # -- internals ------------------------------------------------------------------------------------
    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ConfigError("this engine has no tokenizer; pass token ids or give Engine a tokenizer")
        return self.tokenizer

    def _check_length(self, prompt_len: int, max_tokens: int) -> None:
        # learned absolute positions have a table of max_seq_len rows: past it there is no position at all
        if self.config.position == "learned":
            used = self.sinks + self.window if self.streaming else prompt_len + max_tokens
            if used > self.config.max_seq_len:
                raise ConfigError(
                    f"{used} positions exceed the {self.config.max_seq_len} learned position "
                    "embeddings; shorten the prompt or max tokens"
                )

    def _groups(self, requests: list[Request]) -> list[list[int]]:
        """Which requests decode together. Padding is exact unless positions depend on the sequence length
        (dynamic RoPE: rows would share one length) or the cache evicts (streaming): then only prompts of
        equal length share a batch."""
        exact_padding = not self.streaming and not self.model.positions.length_dependent
        buckets: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            buckets.setdefault(0 if exact_padding else len(r.prompt_ids), []).append(i)
        return [b[s : s + self.max_batch] for b in buckets.values() for s in range(0, len(b), self.max_batch)]

    def _run_group(self, requests: list[Request]) -> list[Completion]:
        prompts = [self.encode(r.prompt_ids) for r in requests]
        lens = [len(p) for p in prompts]
        B, L = len(prompts), max(lens)
        rows = [_Row(r, p, self.stop_ids, self.tokenizer, self.device) for r, p in zip(requests, prompts)]
        cache = self.cache_for(B, L + max(r.params.max_tokens for r in requests))
        ids = torch.zeros(B, L, dtype=torch.long)  # right-aligned: row b starts at slot L - lens[b]
        for b, p in enumerate(prompts):
            ids[b, L - len(p) :] = torch.tensor(p)
        pads = [L - n for n in lens]
        if min(lens) != L:
            cache.pad = torch.tensor(pads, device=self.device)
        t0 = time.perf_counter()
        start = self._reuse_prompts(cache, prompts, pads)

        def progress(done: int, total: int) -> None:
            for row in rows:
                row.progress(done, total)

        logits = prefill(self.model, cache, ids[:, start:].to(self.device), self.prefill_chunk, progress)
        t1 = time.perf_counter()
        if self.prompt_cache is not None:
            for b, p in enumerate(prompts):
                m = self.prompt_cache.storable(len(p))
                self.prompt_cache.store(p[:m], lambda b=b, m=m: cache.row_states(b, pads[b], m))
        live = list(range(B))  # rows[live[j]] sits at cache row j
        step_ids = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        while True:
            keep, feed = [], []
            for j, r in enumerate(live):
                tok = rows[r].step(logits[j])
                if tok is not None:
                    keep.append(j)
                    feed.append(tok)
            if not keep:
                break
            if len(keep) < len(live):
                cache.select_rows(torch.tensor(keep, device=self.device))
                live = [live[j] for j in keep]
            step_ids = step_ids[: len(feed)]
            step_ids[:, 0] = torch.tensor(feed)
            if self.exact_dynamic and self._frequencies_change(cache.length, cache.length + 1):
                # rows of a length-dependent group all have the same length: rebuild from all their tokens
                full = torch.tensor([rows[r].prompt_ids + rows[r].new_ids for r in live], device=self.device)
                cache.reset()
                logits = prefill(self.model, cache, full, self.prefill_chunk)
            else:
                logits = forward_last(self.model, cache, step_ids)
        t2 = time.perf_counter()
        return [r.completion(max(0, start - pad), t1 - t0, t2 - t1) for r, pad in zip(rows, pads)]

    def _reuse_prompts(self, cache: KVCache, prompts: list[list[int]], pads: list[int]) -> int:
        """Load every row's longest cached prefix into `cache` -> the slot the prefill starts from (all
        rows prefill from the same slot: the least any row reused, cut to whole chunks so that a single
        row's prefill runs on the chunk boundaries of an uncached one)."""
        if self.prompt_cache is None:
            return 0
        ends = []
        for b, p in enumerate(prompts):
            n, entry = self.prompt_cache.lookup(p)
            if entry is not None:
                cache.load_row(b, pads[b], entry.states, n)
            ends.append(pads[b] + n)
        cache.length = min(ends) // self.prefill_chunk * self.prefill_chunk
        return cache.length

    def prompt_cache_stats(self) -> dict | None:
        return None if self.prompt_cache is None else self.prompt_cache.stats()

    def _frequencies_change(self, old_len: int, new_len: int) -> bool:
        """Whether RoPE for `new_len` tokens differs from RoPE for `old_len` (length-dependent types)."""
        f = self.model.positions.frequencies
        (inv_a, af_a), (inv_b, af_b) = f(old_len), f(new_len)
        return af_a != af_b or not torch.equal(inv_a, inv_b)


def generate_tokens(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    stop_ids: set[int] | None = None,
    prefill_chunk: int = 512,
    spec: EngineSpec | None = None,
) -> list[int]:
    """Greedy continuation of one prompt -> the new token ids (stops early at a stop id, kept)."""
    if max_new_tokens <= 0:
        return []
    params = SamplingParams(max_tokens=max_new_tokens, stop_ids=set(stop_ids or ()))
    spec = spec or EngineSpec(prefill_chunk=prefill_chunk)
    # one prompt: nothing to reuse later, so keep no states
    return (
        Engine(model, None, spec, stop_at_eos=False, prompt_cache_mb=0).generate(prompt_ids, params).token_ids
    )


def load_engine(
    ckpt: str, spec: EngineSpec | None = None, device: str = "auto", quiet: bool = False
) -> Engine:
    """The engine for a checkpoint (any format): weights in `spec.dtype` (or quantized) on `device`, its
    tokenizer. With dtype auto or quantize, prints one line saying how the weights run (unless quiet)."""
    from longctx.checkpoint import gguf_blocks, load_model, load_tokenizer
    from longctx.device import resolve_device

    dev = resolve_device(device)
    spec, why = (spec or EngineSpec()).resolved(dev)
    config = None
    if spec.context_method is not None:
        from longctx.attention.context_methods import method_spec
        from longctx.checkpoint import load_config

        base = load_config(ckpt)
        options = {k: v for k, v in spec.context_method.items() if k not in ("name", "factor")}
        method = method_spec(spec.context_method["name"], base.max_seq_len, spec.context_method.get("factor"),
                             **options)  # fmt: skip
        config = base.replace(context_method=method)
    model = load_model(ckpt, device=dev, config=config)
    model = model.to(torch.float32 if spec.quantize else spec.torch_dtype)  # quantized: fp32 activations
    line = f"weights {spec.dtype} (auto: {why})" if why else None
    if spec.quantize is not None:
        from longctx.infer.quant import quantize_model

        low = spec.prefill_dtype()
        line = quantize_model(model, spec.quantize, gguf_blocks(ckpt), low).summary(spec.quantize)
        line += f"; prefill in {'bf16' if low == torch.bfloat16 else 'fp32'} arithmetic" + (
            f" (auto: {why})" if why else ""
        )
    # the linears' inference routes from the start, not from the first decode step: evaluation scores
    # windows with the model's own forward (SmolLM2 in bf16, one 4096-token window, AVX2-only EPYC, where
    # the routes upcast to fp32 GEMMs: 60.4 -> 24.0 s)
    decode_ops.install(model)
    engine = Engine(model, load_tokenizer(ckpt), spec)
    if line and spec.kv_dtype != engine.kv_dtype:  # what the engine's auto chose, said where it was chosen
        line += (
            f"; KV cache {engine.kv_dtype} (auto under quantized weights; --kv-cache-dtype fp32 for exact)"
        )
    if line and not quiet:
        print(f"{ckpt}: {line}", file=sys.stderr)
    return engine
