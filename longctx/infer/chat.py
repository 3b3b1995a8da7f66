"""Chat messages -> one prompt string.

The template is, in order of preference:
1. `config.extra["chat_template"]` of the checkpoint, a Jinja template in Hugging Face's format
   (it sees `messages`, `add_generation_prompt`, `bos_token`, `eos_token`);
2. the tokenizer's `chat_template` attribute (an HF tokenizer that carries one);
3. the plain default below, one block per message and an open assistant block at the end:

       <|system|>
       You are terse.
       <|user|>
       Hi!
       <|assistant|>

   With the default template, generation also stops at "<|" (the model starting the next turn).
Templates are rendered in Jinja's sandbox (as transformers does): a checkpoint's template cannot run code.
"""

from __future__ import annotations

from typing import Any

from longctx.errors import ConfigError

DEFAULT_STOP = ["<|"]
ROLES = ("system", "user", "assistant", "tool", "developer")


def default_template(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = ""):
        """source: a Jinja template, or None for the plain default."""
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        self._compiled = None
        if source is not None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            try:
                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                self._compiled = env.from_string(source)
            except TemplateError as e:
                raise ConfigError(
                    f"the checkpoint's chat template does not parse ({e}); fix "
                    "config.extra['chat_template'] or remove it to use the default"
                ) from None

    @property
    def default_stop(self) -> list[str]:
        return DEFAULT_STOP if self._compiled is None else []

    def render(self, messages: list[dict[str, str]]) -> str:
        if self._compiled is None:
            return default_template(messages)
        from jinja2 import TemplateError

        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as e:
            raise ConfigError(f"the chat template failed on these messages: {e}") from None


def template_for(config_extra: dict[str, Any], tokenizer: Any) -> ChatTemplate:
    source = config_extra.get("chat_template") or getattr(tokenizer, "chat_template", None)
    return ChatTemplate(source if isinstance(source, str) else None)
