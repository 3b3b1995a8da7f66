"""Hugging Face interop: read Llama / Mistral / Qwen2 directories as longctx models and write them back.

    config_from_hf(path) -> GPTConfig          load_hf_model(path, device=None, config=None) -> GPT
    import_from_hf(hf_dir, out_dir)            export_to_hf(ckpt_or_model, out_dir, ...)
    export_lora_adapter(gpt_with_lora, out_dir)   # PEFT adapter for the exported model

`longctx.checkpoint.load_model` routes HF directories here, so every command accepts them directly.
"""

from longctx.interop.hf import (
    SUPPORTED_ARCHITECTURES,
    config_from_hf,
    export_to_hf,
    hf_config_dict,
    import_from_hf,
    load_hf_model,
)
from longctx.interop.lora import export_lora_adapter

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "config_from_hf",
    "export_lora_adapter",
    "export_to_hf",
    "hf_config_dict",
    "import_from_hf",
    "load_hf_model",
]
