"""Chat templates pagedllm ships: a tool-calling template for ChatML models whose own template
cannot render tools (as vLLM ships examples/tool_chat_template_*.jinja)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

HERE = Path(__file__).parent


@cache
def chatml_tools_template() -> str:
    return (HERE / "chatml_tools.jinja").read_text()


class ToolTemplateError(ValueError):
    """The conversation has tools or tool turns and no template can render them."""


def renders_tools(template: str) -> bool:
    """A template that uses the ``tools`` variable (Qwen2.5, Llama 3.1, Hermes, ...)."""
    return "tools" in template


def tool_template(template: str | None) -> str:
    """The template to render a conversation with tools or tool turns: the model's own when it
    renders tools, else pagedllm's ChatML one for a ChatML model; ValueError otherwise."""
    if template and renders_tools(template):
        return template
    if template and "<|im_start|>" in template:
        return chatml_tools_template()
    raise ToolTemplateError(
        "this model's chat template cannot render tools, and it is not a ChatML template "
        "pagedllm has a tool template for: start the server with --chat-template FILE "
        "holding a template that renders `tools`"
    )
