"""Tool calling for /v1/chat/completions: what a request's ``tools`` / ``tool_choice`` ask for
(``ToolPlan``), the grammar that enforces ``"required"`` and a named function, and the
streaming of parsed calls as OpenAI's tool-call deltas.

- ``"none"``: the tools are not rendered; the answer is text.
- ``"auto"`` (the default with tools): the tools are rendered through the chat template and
  the server's tool-call parser reads calls out of the answer, if any.
- ``"required"``: the answer is a JSON list of one or more calls (one if
  ``parallel_tool_calls`` is false), each naming one of the tools with arguments that follow
  its parameters schema, enforced by a grammar (so even a 135M model returns a valid call).
- a named function: the answer is that function's arguments, enforced by its schema.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.structured_output.backend import json_schema_problem
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from pagedllm.entrypoints.openai.tool_parsers import (
    NamedToolParser,
    ParsedOutput,
    ToolParser,
    XlamToolParser,
)
from pagedllm.sampling_params import StructuredOutputsParams

ANY_OBJECT = {"type": "object"}


@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool dicts, rendered
    function: str | None = None  # the named one
    grammar: StructuredOutputsParams | None = None

    @property
    def renders_tools(self) -> bool:
        return self.mode != "none" and bool(self.tools)


def tool_plan(req: ChatCompletionRequest) -> ToolPlan:
    """Validate tools and tool_choice (400 naming the field) and plan the answer."""
    if not req.tools:
        for name in ("tool_choice", "parallel_tool_calls"):
            if getattr(req, name) is not None and req.tool_choice != "none":
                raise OpenAIError(f"{name} is only allowed when tools are given", param=name)
        return ToolPlan(mode="none")
    names = [t.function.name for t in req.tools]
    for i, tool in enumerate(req.tools):
        if tool.function.name in names[:i]:
            raise OpenAIError(
                f"two tools are named {tool.function.name!r}", param=f"tools.{i}.function.name"
            )
        if tool.function.parameters is not None:
            check_parameters_schema(tool.function.parameters, f"tools.{i}.function.parameters")
    tools = [t.model_dump(mode="json", exclude_none=True) for t in req.tools]
    choice = req.tool_choice or "auto"
    if choice == "none":
        return ToolPlan(mode="none", tools=tools)
    if choice == "auto":
        return ToolPlan(mode="auto", tools=tools)
    parameters = {t.function.name: t.function.parameters or ANY_OBJECT for t in req.tools}
    if choice == "required":
        call_schemas = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": schema},
                "required": ["name", "arguments"],
            }
            for name, schema in parameters.items()
        ]
        items = call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}
        schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
        if req.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan(
            mode="required",
            tools=tools,
            grammar=StructuredOutputsParams(json=schema),
        )
    name = choice.function.name
    if name not in parameters:
        raise OpenAIError(
            f"tool_choice names the function {name!r}, which is not among the tools "
            f"({', '.join(parameters)})",
            param="tool_choice.function.name",
        )
    return ToolPlan(
        mode="named",
        tools=tools,
        function=name,
        grammar=StructuredOutputsParams(json=parameters[name]),
    )


def check_parameters_schema(schema: dict[str, Any], param: str) -> None:
    problem = json_schema_problem(schema)
    if problem is not None:
        raise OpenAIError(
            f"the parameters are not a valid JSON schema (at {problem[0]}): {problem[1]}",
            param=param,
        )


def parser_for(plan: ToolPlan, server_parser: ToolParser | None) -> ToolParser | None:
    if plan.mode == "named":
        assert plan.function is not None
        return NamedToolParser(plan.function)
    if plan.mode == "required":
        return XlamToolParser()  # the grammar's bare JSON list
    if plan.mode == "auto":
        return server_parser
    return None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls_of(parsed: ParsedOutput) -> list[ToolCall]:
    return [
        ToolCall(id=new_call_id(), function=FunctionCall(name=c.name or "", arguments=c.arguments))
        for c in parsed.calls
    ]


class ToolCallStream:
    """One choice's stream: feed it the cumulative text after each step; it returns the new
    content and the tool-call deltas since the last feed."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.content_sent = 0
        self.ids: list[str] = []  # per call whose header was sent
        self.args_sent: list[int] = []

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def feed(self, text: str, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        parsed = self.parser.parse_final(text) if finished else self.parser.parse(text)
        if finished and not parsed.calls and self.called:
            # Calls already sent turned out malformed at the end: keep to what was sent.
            parsed = self.parser.parse(text)
        content = parsed.content[self.content_sent :]
        self.content_sent = max(self.content_sent, len(parsed.content))
        deltas = []
        for i, call in enumerate(parsed.calls):
            if i == len(self.ids):
                if call.name is None:
                    break  # later calls cannot be announced before this one
                self.ids.append(new_call_id())
                self.args_sent.append(0)
                deltas.append(
                    DeltaToolCall(
                        index=i,
                        id=self.ids[i],
                        type="function",
                        function=DeltaFunctionCall(name=call.name, arguments=""),
                    )
                )
            fragment = call.arguments[self.args_sent[i] :]
            if fragment:
                self.args_sent[i] = len(call.arguments)
                deltas.append(
                    DeltaToolCall(index=i, function=DeltaFunctionCall(arguments=fragment))
                )
        return content, deltas


def message_tool_calls_json(tool_calls: list[dict[str, Any]], where: str) -> None:
    """400 for an assistant message's tool_calls that a template could not render back."""
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise OpenAIError(
                "a tool call is {'id', 'type': 'function', 'function': {'name', 'arguments'}}",
                param=f"{where}.tool_calls.{j}.function",
            )
        args = fn.get("arguments", "{}")
        try:
            json.loads(args) if isinstance(args, str) else None
        except ValueError:
            raise OpenAIError(
                "function.arguments must be a JSON string", param=f"{where}.tool_calls.{j}"
            ) from None
