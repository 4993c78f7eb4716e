"""Llama 3.1/3.2's JSON format: ``{"name": "f", "parameters": {...}}`` (several separated by
``;``), optionally after ``<|python_tag|>``; the whole answer is the calls."""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import (
    MalformedCall,
    ParsedOutput,
    ToolParser,
    scan_call,
    skip_whitespace,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    start_markers = (PYTHON_TAG,)

    def parse(self, text: str) -> ParsedOutput:
        i = skip_whitespace(text, 0)
        if i == len(text):
            return ParsedOutput(content="")  # whitespace so far: calls may still follow
        if text.startswith(PYTHON_TAG, i):
            i = skip_whitespace(text, i + len(PYTHON_TAG))
        elif PYTHON_TAG.startswith(text[i:]):
            return ParsedOutput(content="")  # maybe the tag, still arriving
        if i >= len(text) or text[i] != "{":
            return ParsedOutput(content=text[: len(text) - self.held_back(text)])
        out = ParsedOutput(content="")
        try:
            while i < len(text):
                call, end = scan_call(text, i)
                out.calls.append(call)
                if end is None:
                    break
                i = skip_whitespace(text, end)
                if i < len(text) and text[i] == ";":
                    i = skip_whitespace(text, i + 1)
                if i < len(text) and text[i] != "{":
                    raise MalformedCall("calls are separated by ';'")
        except MalformedCall:
            return ParsedOutput(content=text)
        return out
