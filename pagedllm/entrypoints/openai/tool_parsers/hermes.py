"""Hermes' format (Qwen2.5, Hermes, many others): each call is a JSON object in its own tags,
``<tool_call>{"name": "f", "arguments": {...}}</tool_call>``; content is the text before the
first call."""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import (
    MalformedCall,
    ParsedOutput,
    ToolParser,
    scan_call,
    skip_whitespace,
)

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    start_markers = (START,)

    def parse(self, text: str) -> ParsedOutput:
        first = text.find(START)
        if first < 0:
            return ParsedOutput(content=text[: len(text) - self.held_back(text)])
        out = ParsedOutput(content=text[:first])
        i = first
        try:
            while i >= 0:
                body = skip_whitespace(text, i + len(START))
                if body >= len(text):
                    break
                if text[body] != "{":
                    raise MalformedCall("a tool call is a JSON object")
                call, end = scan_call(text, body)
                out.calls.append(call)
                if end is None:
                    break
                i = text.find(START, end)
        except MalformedCall:
            return ParsedOutput(content=text)
        return out
