"""Tasks on long inputs: classification and generation fine-tuning, PEFT (LoRA, adapters, prefix), MLM."""

from longctx.tasks.finetune import FinetuneArgs, FinetuneResult, finetune, load_finetuned, sweep
from longctx.tasks.heads import ClassificationModel
from longctx.tasks.peft_methods import PeftSpec, apply_peft, merge_peft

__all__ = [
    "ClassificationModel",
    "FinetuneArgs",
    "FinetuneResult",
    "PeftSpec",
    "apply_peft",
    "finetune",
    "load_finetuned",
    "merge_peft",
    "sweep",
]
