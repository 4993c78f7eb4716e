"""xLAM's format, which SmolLM2 was trained on: one JSON list of calls,
``[{"name": "f", "arguments": {...}}, ...]``, alone or inside ``<tool_call>...</tool_call>``
(also what a ``tool_choice: "required"`` grammar produces, bare). Content is the text before
the calls."""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import (
    MalformedCall,
    ParsedOutput,
    ToolParser,
    scan_call,
    scan_call_list,
    skip_whitespace,
)

START = "<tool_call>"


class XlamToolParser(ToolParser):
    name = "xlam"
    start_markers = (START,)

    def parse(self, text: str) -> ParsedOutput:
        lead = skip_whitespace(text, 0)
        if lead == len(text):
            return ParsedOutput(content="")  # whitespace so far: calls may still follow
        if text[lead] in "[{":
            start, body = 0, lead  # the whole answer is the calls
        else:
            tag = text.find(START)
            if tag < 0:
                return ParsedOutput(content=text[: len(text) - self.held_back(text)])
            start, body = tag, skip_whitespace(text, tag + len(START))
        out = ParsedOutput(content=text[:start])
        if body >= len(text):
            return out
        try:
            if text[body] == "[":
                out.calls, _ = scan_call_list(text, body)
            elif text[body] == "{":
                out.calls = [scan_call(text, body)[0]]
            else:
                raise MalformedCall("tool calls are a JSON list")
        except MalformedCall:
            return ParsedOutput(content=text)
        return out
