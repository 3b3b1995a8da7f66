"""Context extension: re-configure a checkpoint's positions for a longer context and fine-tune it
(full, or LoRA + trainable embeddings/norms as LongLoRA; optionally with S²-Attn). See `recipe.extend`."""

from longctx.extend.recipe import ExtendArgs, ExtendResult, extend, extended_config, methods, reconfigure

__all__ = ["ExtendArgs", "ExtendResult", "extend", "extended_config", "methods", "reconfigure"]
