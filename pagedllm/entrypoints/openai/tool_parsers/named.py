"""The answer to a named ``tool_choice``: the grammar makes the whole output the arguments of
that one function, so the call's name is known before any token."""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import (
    ParsedCall,
    ParsedOutput,
    ToolParser,
    scan_value,
    skip_whitespace,
)


class NamedToolParser(ToolParser):
    name = "named"

    def __init__(self, function_name: str) -> None:
        self.function_name = function_name

    def parse(self, text: str) -> ParsedOutput:
        start = skip_whitespace(text, 0)
        end = scan_value(text, start) if start < len(text) else None
        arguments = text[start : len(text) if end is None else end]
        return ParsedOutput(
            content="", calls=[ParsedCall(self.function_name, arguments, closed=end is not None)]
        )
