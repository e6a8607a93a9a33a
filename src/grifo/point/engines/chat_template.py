"""A model's chat template (the Jinja template in its GGUF metadata): chat messages rendered
into the prompt text the model was trained on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grifo.errors import InvalidRequestError


class ChatTemplate:
    """Renders messages with `model`'s template (a llama-cpp-python `LlamaModel`); a model
    without one answers completions only."""

    def __init__(self, model: Any, model_id: str) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.model_id = model_id
        template = model.metadata().get("tokenizer.chat_template")
        self._formatter = (
            Jinja2ChatFormatter(
                template=template,
                eos_token=_token_text(model, model.token_eos()),
                bos_token=_token_text(model, model.token_bos()),
            )
            if template
            else None
        )

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        if self._formatter is None:
            raise InvalidRequestError(
                f"model {self.model_id} has no chat template; use /v1/completions",
                code="chat_not_supported",
            )
        try:
            return str(self._formatter(messages=list(messages)).prompt)  # type: ignore[arg-type]
        except Exception as exc:  # the template may reject a message sequence
            raise InvalidRequestError(
                f"the model's chat template rejected the messages: {exc}"
            ) from None


def _token_text(model: Any, token: int) -> str:
    """A special token's text (the template's `bos_token`, `eos_token`); none for -1."""
    if token < 0:
        return ""
    return str(model.detokenize([token], special=True).decode("utf-8", "replace"))
