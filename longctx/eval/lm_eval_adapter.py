"""lm-evaluation-harness adapter: the model class `longctx` (lm-eval >= 0.4.5, the optional [eval] extra).

    pip install "longctx[eval]"
    python -m longctx.eval.lm_eval_adapter --model longctx --model_args ckpt=DIR --tasks TASKS [...]

lm-eval finds models in its registry; this module registers `longctx` when imported (lm-eval 0.4 has no
plugin entry point for models), and running it as `-m` imports it and then hands every argument to
lm-eval's own command line. From Python: `import longctx.eval.lm_eval_adapter` then
`lm_eval.simple_evaluate(model="longctx", model_args="ckpt=DIR", tasks=[...])`.

model_args: ckpt (required), dtype (float32|bfloat16|float16), max_length (default the checkpoint's context
length); the device comes from lm-eval's `--device` (default cuda when available). Scoring uses `longctx.eval.ppl.score_tokens`
(chunked logits, float64 sums); generation is greedy (`generate_until` ignores sampling settings).
"""

from __future__ import annotations

import logging
from typing import Any

from tqdm import tqdm

from longctx.errors import ConfigError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ConfigError(
        'lm-eval is not installed; `pip install "lm-eval>=0.4.5,<0.5"` (or `pip install longctx[eval]`)'
    ) from e

log = logging.getLogger(__name__)


class LongctxLM(TemplateLM):
    def __init__(
        self,
        ckpt: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        max_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        import torch

        from longctx.checkpoint import load_model, load_tokenizer
        from longctx.device import resolve_device
        from longctx.infer.engine import EngineSpec

        if not ckpt:
            raise ConfigError("the longctx lm-eval model needs model_args ckpt=DIR")
        weights = EngineSpec(dtype=dtype).torch_dtype  # a one-line error naming the dtypes
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's CLI passes device="cuda" by default; on a machine without one, use the CPU (as HFLM)
            device = "auto"
        self._device = resolve_device(device)
        device = self._device
        ignored = {k: v for k, v in kwargs.items() if k not in ("batch_size", "max_batch_size")}
        if ignored:
            log.warning("longctx lm-eval model ignores model_args %s", sorted(ignored))
        self.model = load_model(ckpt, device=device).to(weights).eval()
        self.tok = load_tokenizer(ckpt)
        self._max_length = int(max_length) if max_length else self.model.config.context_length

    # -- what TemplateLM needs ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) and whether every continuation token is the greedy choice; the
        context is cut from the left so at most max_length tokens are fed (as HFLM does)."""
        import torch

        from longctx.eval.ppl import score_tokens

        whole = (context + continuation)[-(self.max_length + 1) :]
        first = max(1, len(whole) - len(continuation))
        ids = torch.tensor(whole, dtype=torch.long, device=self.model.head_weight.device)
        nll, greedy = score_tokens(self.model, ids, first, with_greedy=True, feed_last=False)  # as HFLM
        return -float(nll.sum()), bool(greedy.all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any):
        out = []
        for cache_key, context, continuation in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            result = self._score(list(context), list(continuation))
            self.cache_hook.add_partial("loglikelihood", cache_key, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Full log-likelihood of each text: disjoint max_length windows, lm-eval's own windowing."""
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            windows = map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            total = sum(self._score(ctx, pred)[0] for ctx, pred in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from longctx.eval.genmetrics import cut_at_stop
        from longctx.eval.prompting import GreedyAnswers

        answer, out = GreedyAnswers(self.model, self.tok), []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or [self.tok.decode([self.eot_token_id]) or "<|endoftext|>"]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                log.warning("longctx lm-eval model decodes greedily; ignoring sampling settings %s", kwargs)
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
            text = cut_at_stop(answer(ids, max_new), until)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


if __name__ != "__main__":  # run as a script, `main` imports the module proper, which registers
    register_model("longctx")(LongctxLM)


def main() -> None:
    """`python -m longctx.eval.lm_eval_adapter ARGS`: lm-eval's CLI with the `longctx` model registered."""
    from lm_eval.__main__ import cli_evaluate

    import longctx.eval.lm_eval_adapter  # noqa: F401 - registers `longctx`

    cli_evaluate()


if __name__ == "__main__":
    main()
