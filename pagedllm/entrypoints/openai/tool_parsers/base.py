"""What every tool-call parser returns, and the partial-JSON scanning they share.

A parser reads the model's whole text so far (streaming: after every step) and says which part
is plain content and which tool calls it holds, each call's arguments as the raw JSON text the
model wrote. Parsing the same growing text again only ever extends what it returned before
(content grows until the first call starts; a call's arguments grow until they close), so a
stream sends the differences and they join to the non-streamed answer exactly."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

WHITESPACE = " \t\r\n"


@dataclass
class ParsedCall:
    name: str | None  # None until the name's JSON string is complete
    arguments: str  # the raw JSON text of the arguments so far
    closed: bool = False  # the call (and so its arguments) is complete


@dataclass
class ParsedOutput:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)

    @property
    def valid_calls(self) -> bool:
        """Calls that a client can run: each one named and with a JSON object of arguments."""
        if not self.calls:
            return False
        for call in self.calls:
            if not call.closed or call.name is None:
                return False
            try:
                if not isinstance(json.loads(call.arguments), dict):
                    return False
            except ValueError:
                return False
        return True


class ToolParser(ABC):
    name: str
    # Strings that start tool calls: text ending in a prefix of one is held back from content.
    start_markers: tuple[str, ...] = ()

    @abstractmethod
    def parse(self, text: str) -> ParsedOutput:
        """The content and the calls of ``text`` (possibly cut mid-call)."""

    def parse_final(self, text: str) -> ParsedOutput:
        """The finished text: calls only if all of them are whole and valid, else all of it
        is content (as vLLM does with malformed calls)."""
        parsed = self.parse(text)
        if parsed.calls and parsed.valid_calls:
            return parsed
        return ParsedOutput(content=text)

    def held_back(self, text: str) -> int:
        """How many trailing characters might begin a start marker (not content yet)."""
        longest = max((len(m) for m in self.start_markers), default=0)
        for keep in range(min(len(text), longest), 0, -1):
            tail = text[-keep:]
            if any(m.startswith(tail) for m in self.start_markers):
                return keep
        return 0


def skip_whitespace(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def scan_string(text: str, i: int) -> int | None:
    """``text[i]`` is '"': the index after the closing quote, None if the string is cut."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
        elif c == '"':
            return i + 1
        else:
            i += 1
    return None


def scan_value(text: str, i: int) -> int | None:
    """The end of the JSON value starting at ``text[i]``; None if it is cut (a number or
    literal counts as cut until a delimiter follows it)."""
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        return scan_string(text, i)
    if c in "{[":
        depth = 0
        while i < len(text):
            c = text[i]
            if c == '"':
                end = scan_string(text, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}]" + WHITESPACE:
        j += 1
    return j if j < len(text) else None


class MalformedCall(ValueError):
    """The text is not a call object (the caller then treats it as content)."""


def scan_call(
    text: str, i: int, arg_keys: tuple[str, ...] = ("arguments", "parameters")
) -> tuple[ParsedCall, int | None]:
    """``text[i]`` is '{': a call object {"name": ..., "arguments": {...}} (in any key order)
    -> the call so far and the index after its closing brace (None while it is cut)."""
    call = ParsedCall(name=None, arguments="")
    i += 1
    while True:
        i = skip_whitespace(text, i)
        if i >= len(text):
            return call, None
        if text[i] == "}":
            if not call.arguments:  # {"name": "now"}: a function without parameters
                call.arguments = "{}"
            call.closed = True
            return call, i + 1
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            raise MalformedCall(f"expected a key at {i}")
        key_end = scan_string(text, i)
        if key_end is None:
            return call, None
        key = json.loads(text[i:key_end])
        colon = skip_whitespace(text, key_end)
        if colon >= len(text):
            return call, None
        if text[colon] != ":":
            raise MalformedCall(f"expected ':' at {colon}")
        start = skip_whitespace(text, colon + 1)
        end = scan_value(text, start)
        if key == "name":
            if end is not None:
                name = json.loads(text[start:end])
                if not isinstance(name, str):
                    raise MalformedCall("the name is not a string")
                call.name = name
        elif key in arg_keys:
            call.arguments = text[start : len(text) if end is None else end]
        if end is None:
            return call, None
        i = end


def scan_call_list(text: str, i: int) -> tuple[list[ParsedCall], int | None]:
    """``text[i]`` is '[': a JSON list of call objects -> the calls so far and the index after
    the closing bracket (None while it is cut)."""
    calls: list[ParsedCall] = []
    i += 1
    while True:
        i = skip_whitespace(text, i)
        if i >= len(text):
            return calls, None
        c = text[i]
        if c == "]":
            return calls, i + 1
        if c == ",":
            i += 1
            continue
        if c != "{":
            raise MalformedCall(f"expected a call object at {i}")
        call, end = scan_call(text, i)
        calls.append(call)
        if end is None:
            return calls, None
        i = end
