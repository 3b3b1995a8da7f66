"""Language-model training on a corpus: `train(TrainArgs)`, what `longctx train` runs and `extend` fine-tunes
with. It assembles the pieces and hands them to the one `Trainer`:

    tokenizer + corpus -> token cache -> TokenBatches (curriculum, retrieval mix, MLM masking)
    model (a new one from a preset, or the caller's) -> StepShape resolved once (--seq-len auto and
    --checkpointing auto asked of the planner) -> TokenLoss -> ModelCheckpoint -> Trainer.run()

Nothing given is mutated: a new model's trained length goes into the config that is *saved*.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from longctx.config import GPTConfig
from longctx.data.batches import TokenBatches
from longctx.data.cache import token_file
from longctx.data.tokenizer import Tokenizer, load_tokenizer
from longctx.device import resolve_device, resolve_precision
from longctx.errors import ConfigError
from longctx.model import GPT
from longctx.train.objectives import TokenLoss
from longctx.train.planner import choose_checkpointing, max_seq_len_for_memory, parse_bytes
from longctx.train.schedules import Curriculum
from longctx.train.spec import LoopSpec, OptimizerSpec, StepShape, embedded, from_flat, to_flat
from longctx.train.trainer import ModelCheckpoint, Trainer, TrainResult

OBJECTIVES = ("clm", "mlm")


@dataclass
class TrainArgs:
    preset: str = "tiny"
    config_overrides: dict[str, Any] = field(default_factory=dict)
    data: str | None = None  # None: the embedded corpus (Python's standard library)
    tokenizer: str = "byte"
    seq_len: int = 256  # 0: "auto", the longest the planner fits in --memory
    seq_len_schedule: str | None = None  # "128:0,256:1000" (length from a step on)
    batch_size: int = 8
    restart_positions: bool = False  # positions restart at every document in a packed row
    retrieval_mix: float = 0.0  # share of rows replaced by synthetic passkey-style retrieval samples
    objective: str = "clm"  # clm: next token | mlm: masked tokens, bidirectional model
    cache_dir: str | None = None
    val_fraction: float = 0.05
    optim: OptimizerSpec = embedded(OptimizerSpec)
    loop: LoopSpec = embedded(LoopSpec)

    @classmethod
    def from_flat(cls, **values: Any) -> TrainArgs:
        """TrainArgs from flat option names (`steps=10, lr=3e-3, preset="tiny"`), as the CLI gives them."""
        return from_flat(cls, values)

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        self.optim.validate()
        self.loop.validate()
        need(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        need(
            self.seq_len > 0 or self.loop.memory is not None,
            "--seq-len must be positive (or 'auto' together with --memory)",
        )
        need(0.0 <= self.retrieval_mix <= 1.0, "--retrieval-mix must be in [0, 1]")
        need(self.objective in OBJECTIVES, f"unknown --objective {self.objective!r}; choose clm or mlm")


def resolve_shape(
    shape: StepShape, *, auto_length: bool, checkpointing: str, memory: str | None
) -> StepShape:
    """The shape a run trains, planned once: with `auto_length` the seq_len is the longest the planner fits
    in `memory` (with the leanest checkpointing when that is auto too); checkpointing 'auto' becomes the
    fastest that fits. Every other field of `shape` (loss chunk included) is planned as it is."""
    if (auto_length or checkpointing == "auto") and memory is None:
        raise ConfigError("--seq-len auto and --checkpointing auto need --memory (e.g. 20GiB)")
    if auto_length:
        lean = "all" if checkpointing == "auto" else checkpointing
        budget = parse_bytes(memory)
        n = max_seq_len_for_memory(shape.replace(checkpointing=lean), budget)
        if n == 0:
            raise ConfigError(f"not even 256 tokens fit in {memory}; raise --memory or use a smaller model")
        return shape.replace(seq_len=n, checkpointing=lean)
    if checkpointing == "auto":
        return shape.replace(checkpointing=choose_checkpointing(shape, parse_bytes(memory)))
    return shape.replace(checkpointing=checkpointing)


def train(
    args: TrainArgs,
    model: GPT | None = None,
    tokenizer: Tokenizer | None = None,
    export_model: Callable[[torch.nn.Module], GPT] | None = None,
    attention: Callable[..., torch.Tensor] | None = None,
) -> TrainResult:
    """Train `model` (or a new one from `args.preset` + overrides) and write checkpoints to `args.loop.out`.

    export_model: what each checkpoint saves of the trained model (e.g. LoRA merged into a copy);
    attention: a backend for every training forward (S²-Attn, `longctx extend --s2-attn`)."""
    args.validate()
    loop = args.loop
    torch.manual_seed(loop.seed)
    tokenizer = tokenizer or load_tokenizer(args.tokenizer)
    device = resolve_device(loop.device)
    config = model.config if model is not None else _new_config(args, tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{config.vocab_size}; set vocab_size >= {tokenizer.vocab_size}"
        )
    if args.objective == "mlm":
        from longctx.data.masking import require_encoder

        require_encoder(config)
    shape = resolve_shape(
        _step_shape(args, config, device),
        auto_length=args.seq_len <= 0,
        checkpointing=loop.checkpointing,
        memory=loop.memory,
    )
    curriculum = Curriculum.parse(args.seq_len_schedule, shape.seq_len, args.batch_size)
    if model is None:
        # a new model's trained context is the longest length it will see here, not the preset's
        if "max_seq_len" not in args.config_overrides:
            config = config.replace(max_seq_len=curriculum.max_len)
        model = GPT(config)
    if config.position == "learned" and curriculum.max_len > config.max_seq_len:
        raise ConfigError(
            f"training length {curriculum.max_len} exceeds the learned position table "
            f"({config.max_seq_len}); set max_seq_len or extend the model first"
        )
    saved = config
    if curriculum.max_len > config.max_seq_len and config.rope_scaling is None:
        # the trained context is a property of the weights: record it in the config that gets saved
        saved = config.replace(max_seq_len=curriculum.max_len)
    shape = shape.replace(config=config, seq_len=curriculum.max_len)
    if loop.checkpointing == "auto" and not loop.quiet:
        print(
            f"checkpointing auto: {shape.checkpointing} (the fastest setting the planner fits in {loop.memory})"
        )
    batches = _batches(args, tokenizer, curriculum)
    checkpointer = ModelCheckpoint(loop.out, tokenizer, export=export_model, config=saved, resume=loop.resume)
    trainer = Trainer(
        model, TokenLoss(shape.loss_chunk_size, attention), batches, shape, args.optim, loop, checkpointer
    )
    trainer.setup()
    if trainer.parallel.is_main:  # the options as run (lengths and checkpointing resolved): a --config file
        ran = {**to_flat(args), "seq_len": shape.seq_len, "checkpointing": shape.checkpointing}
        (checkpointer.out / "train_args.json").write_text(json.dumps(ran, indent=2, default=str) + "\n")
    result = trainer.run()
    if export_model is not None:
        result.model = export_model(result.model)
    return result


def _new_config(args: TrainArgs, tokenizer: Tokenizer) -> GPTConfig:
    overrides = dict(args.config_overrides)
    overrides.setdefault("vocab_size", tokenizer.vocab_size)
    if args.objective == "mlm":  # masked-token prediction trains the bidirectional encoder
        overrides.setdefault("causal", False)
    return GPTConfig.from_preset(args.preset, **overrides)


def _step_shape(args: TrainArgs, config: GPTConfig, device: torch.device) -> StepShape:
    """The shape as asked for (with --seq-len auto, a placeholder length `resolve_shape` replaces)."""
    precision, why = resolve_precision(args.loop.precision, device)
    return StepShape(
        config,
        args.seq_len if args.seq_len > 0 else 1,
        args.batch_size,
        "none",
        precision,
        args.optim.optimizer,
        args.loop.loss_chunk_size or None,
        device.type,
        precision_reason=why,
    )


def _batches(args: TrainArgs, tokenizer: Tokenizer, curriculum: Curriculum) -> TokenBatches:
    def tokens(split: str):
        return token_file(
            args.data, tokenizer, split, cache_dir=args.cache_dir, val_fraction=args.val_fraction
        )

    train_only, both = [], []
    if args.retrieval_mix > 0:
        from longctx.data.synthetic import mix_retrieval

        fraction = args.retrieval_mix
        train_only.append(lambda b, seed, i: mix_retrieval(b, tokenizer, fraction, seed=seed, step=i))
    if args.objective == "mlm":
        from longctx.data.masking import mlm_batch

        both.append(lambda b, seed, i: mlm_batch(b, tokenizer, seed=seed, step=i))

    def stage(step: int) -> tuple[int, int]:
        s = curriculum.at(step)
        return s.seq_len, s.batch_size

    return TokenBatches(
        tokens("train"),
        tokens("val"),
        stage,
        seed=args.loop.seed,
        eos_id=tokenizer.eos_id,
        restart_positions=args.restart_positions,
        transforms=both,
        train_only=train_only,
        val_batches=args.loop.eval_batches,
    )
