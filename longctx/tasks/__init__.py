"""Tasks on long inputs: classification and generation fine-tuning (PEFT methods from `longctx.peft`)."""

from longctx.peft import PeftSpec, apply_peft, merge_peft
from longctx.tasks.finetune import FinetuneArgs, FinetuneResult, finetune, load_finetuned, sweep
from longctx.tasks.heads import ClassificationModel

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
