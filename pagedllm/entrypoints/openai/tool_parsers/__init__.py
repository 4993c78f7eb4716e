"""Tool-call parsers, one per output format, chosen once per server (``--tool-call-parser``):
``hermes``, ``xlam`` (SmolLM2's trained format), ``llama3_json``, or ``auto``, which reads the
chat template in use (see chat_templates.tool_template)."""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import ParsedCall, ParsedOutput, ToolParser
from pagedllm.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from pagedllm.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from pagedllm.entrypoints.openai.tool_parsers.named import NamedToolParser
from pagedllm.entrypoints.openai.tool_parsers.xlam import XlamToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, XlamToolParser, Llama3JsonToolParser)
}
TOOL_PARSER_CHOICES = ("auto", *TOOL_PARSERS)


def parser_for_template(template: str) -> ToolParser:
    """``auto`` with a model's own tools-aware template: the format it asks the model for."""
    if "<|python_tag|>" in template or "ipython" in template:
        return Llama3JsonToolParser()
    if "<tool_call>" in template:
        return HermesToolParser()
    return XlamToolParser()


def get_tool_parser(name: str, template: str | None, own_template: bool = False) -> ToolParser:
    """``own_template``: the tools are rendered with pagedllm's template (xLAM's format)."""
    if name == "auto":
        return XlamToolParser() if own_template else parser_for_template(template or "")
    if name not in TOOL_PARSERS:
        raise ValueError(f"--tool-call-parser must be one of {', '.join(TOOL_PARSER_CHOICES)}")
    return TOOL_PARSERS[name]()


__all__ = [
    "HermesToolParser",
    "Llama3JsonToolParser",
    "XlamToolParser",
    "TOOL_PARSERS",
    "TOOL_PARSER_CHOICES",
    "NamedToolParser",
    "ParsedCall",
    "ParsedOutput",
    "ToolParser",
    "get_tool_parser",
]
