"""POST /v1/chat/completions: messages rendered with the model's chat template (or
``--chat-template``), answered whole or as ``chat.completion.chunk`` deltas: a first chunk with
``role: assistant`` per choice, content deltas, ``finish_reason`` in each choice's last chunk,
an optional usage chunk, then ``data: [DONE]``."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from pagedllm.engine.request_stream import RequestStream
from pagedllm.entrypoints.chat_templates import tool_template
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.logprobs import chat_logprobs
from pagedllm.entrypoints.openai.protocol import (
    MAX_LOGPROBS,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    make_usage,
)
from pagedllm.entrypoints.openai.serving import (
    SSE_DONE,
    OpenAIServing,
    PromptInput,
    SSEResponse,
    random_id,
    sse,
    sse_error,
    structured_outputs_param,
)
from pagedllm.entrypoints.openai.tool_calls import (
    ToolCallStream,
    message_tool_calls_json,
    parser_for,
    tool_calls_of,
    tool_plan,
)
from pagedllm.entrypoints.openai.tool_parsers import ToolParser, get_tool_parser
from pagedllm.outputs import CompletionOutput

# Content-part types of other modalities -> what to call them in the error.
NON_TEXT_PARTS = {
    "image_url": "images",
    "input_image": "images",
    "image": "images",
    "input_audio": "audio",
    "audio_url": "audio",
    "video_url": "video",
    "file": "files",
    "input_file": "files",
}


def check_messages(messages: list[ChatMessage]) -> None:
    """400 for what this server cannot honour, rather than dropping it: content parts that are
    not text, and tool-call turns it could not render back."""
    if not messages:
        raise OpenAIError("messages must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if m.function_call is not None:
            raise OpenAIError(
                "function_call (OpenAI's deprecated form) is not supported: use tool_calls",
                param=f"{where}.function_call",
            )
        if m.tool_calls:
            if m.role != "assistant":
                raise OpenAIError("only assistant messages carry tool_calls", param=f"{where}.role")
            message_tool_calls_json(m.tool_calls, where)
        if m.role == "tool" and not isinstance(m.content, (str, list)):
            raise OpenAIError("a tool message needs content", param=f"{where}.content")
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                _check_part(part, f"{where}.content.{j}")


def _check_part(part: dict[str, Any], where: str) -> None:
    kind = part.get("type")
    if kind in NON_TEXT_PARTS:
        raise OpenAIError(
            f"{NON_TEXT_PARTS[kind]} are not supported by this model: it reads text only "
            f"(content part of type {kind!r})",
            param=f"{where}.type",
        )
    if kind != "text":
        raise OpenAIError(
            f"unknown content part type {kind!r}: the accepted one is 'text'", param=f"{where}.type"
        )
    if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
        raise OpenAIError(
            "a text content part is {'type': 'text', 'text': <string>}", param=f"{where}.text"
        )


def messages_to_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


class OpenAIServingChat(OpenAIServing):
    def __init__(self, *args: Any, tool_call_parser: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool_call_parser = tool_call_parser

    async def create(self, req: ChatCompletionRequest, deadline: float | None = None) -> Response:
        lora = self.check_model(req.model)
        model = self.response_model(self.served_model_name, lora)
        self.check_runner("generate")
        num_top = self._check(req)
        plan = tool_plan(req)
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else (req.max_tokens)
        )
        base = self.base_params(req, max_tokens, num_top)
        self.check_fan_out(1, base.n)
        if plan.grammar is not None:
            if base.structured_outputs is not None:
                raise OpenAIError(
                    f"tool_choice {plan.mode!r} sets the output's structure; it cannot be "
                    f"combined with {structured_outputs_param(req)}",
                    param="tool_choice",
                )
            base.structured_outputs = plan.grammar
            await self.compile_grammar(plan.grammar, "tools")
        else:
            await self.compile_structured_outputs(req, base)
        add_generation_prompt = req.add_generation_prompt is not False
        tools = plan.tools if plan.renders_tools else None
        text, ids = await self.tokenizer.apply_chat_template(
            messages_to_dicts(req.messages), add_generation_prompt, tools
        )
        parser = parser_for(plan, self._server_tool_parser() if plan.mode == "auto" else None)
        params = self.params_for_prompt(base, max_tokens, len(ids))
        request_id = random_id("chatcmpl")
        [stream] = await self.add_prompts(request_id, [PromptInput(text, ids)], [params], lora)
        created = int(time.time())
        if req.stream:
            return SSEResponse(
                self._stream(req, request_id, model, created, stream, num_top, parser, deadline)
            )
        return await self._full(request_id, model, created, stream, num_top, parser, deadline)

    def _server_tool_parser(self) -> ToolParser:
        template = self.tokenizer.template
        own = template is not None and tool_template(template) != template
        return get_tool_parser(self.tool_call_parser, template, own_template=own)

    @staticmethod
    def _check(req: ChatCompletionRequest) -> int | None:
        """Validate chat-only fields; -> the number of top logprobs to ask for (None: none)."""
        check_messages(req.messages)
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise OpenAIError("top_logprobs requires logprobs=true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
                raise OpenAIError(
                    f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {req.top_logprobs}",
                    param="top_logprobs",
                )
        if not req.logprobs:
            return None
        return req.top_logprobs or 0

    async def _full(
        self,
        request_id: str,
        model: str,
        created: int,
        stream: RequestStream,
        num_top: int | None,
        parser: ToolParser | None,
        deadline: float | None,
    ) -> Response:
        final = None
        async for _, out in self.outputs([stream], deadline):
            final = out
        assert final is not None
        choices = []
        for c in final.outputs:
            logprobs = None
            if num_top is not None and c.logprobs is not None:
                logprobs = ChatLogprobs(content=chat_logprobs(c.token_ids, c.logprobs, num_top))
            message, finish_reason = ChatResponseMessage(content=c.text), c.finish_reason
            if parser is not None:
                parsed = parser.parse_final(c.text)
                if parsed.calls:
                    message = ChatResponseMessage(
                        content=parsed.content.strip() or None, tool_calls=tool_calls_of(parsed)
                    )
                    finish_reason = "tool_calls"
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=message,
                    logprobs=logprobs,
                    finish_reason=finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
        num_completion = sum(len(c.token_ids) for c in final.outputs)
        response = ChatCompletionResponse(
            id=request_id,
            created=created,
            model=model,
            choices=choices,
            usage=make_usage(len(final.prompt_token_ids), num_completion),
        )
        return JSONResponse(response.model_dump(mode="json"))

    async def _stream(
        self,
        req: ChatCompletionRequest,
        request_id: str,
        model: str,
        created: int,
        stream: RequestStream,
        num_top: int | None,
        parser: ToolParser | None,
        deadline: float | None,
    ) -> AsyncIterator[str]:
        include_usage = req.stream_options is not None and bool(req.stream_options.include_usage)

        def chunk(choices: list[ChatStreamChoice], usage=None) -> str:
            body = ChatCompletionChunk(
                id=request_id,
                created=created,
                model=model,
                choices=choices,
                usage=usage,
            )
            return sse(_chunk_json(body, include_usage))

        n = 1 if req.n is None else req.n
        num_chars, num_tokens, finished = [0] * n, [0] * n, [False] * n
        calls = [ToolCallStream(parser) for _ in range(n)] if parser is not None else None
        num_prompt = 0
        try:
            for i in range(n):
                yield chunk(
                    [ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]
                )
            async for _, out in self.outputs([stream], deadline):
                num_prompt = len(out.prompt_token_ids)
                for c in out.outputs:
                    i = c.index
                    if finished[i]:
                        continue
                    new_ids = c.token_ids[num_tokens[i] :]
                    finish_reason, tool_deltas = c.finish_reason, None
                    if calls is None:
                        text = c.text[num_chars[i] :]
                    else:
                        text, tool_deltas = calls[i].feed(c.text, c.finish_reason is not None)
                        if calls[i].called and finish_reason is not None:
                            finish_reason = "tool_calls"
                    if (
                        not text
                        and not tool_deltas
                        and c.finish_reason is None
                        and (num_top is None or not new_ids)
                    ):
                        continue
                    choice = ChatStreamChoice(
                        index=i,
                        delta=DeltaMessage(content=text or None, tool_calls=tool_deltas or None),
                        logprobs=self._delta_logprobs(c, num_tokens[i], num_top),
                        finish_reason=finish_reason,
                    )
                    num_chars[i], num_tokens[i] = len(c.text), len(c.token_ids)
                    finished[i] = c.finish_reason is not None
                    yield chunk([choice])
            if include_usage:
                yield chunk([], make_usage(num_prompt, sum(num_tokens)))
        except Exception as exc:
            yield sse_error(exc)
        finally:
            # NOTE: also runs when the response closes this generator at a yield (the client
            # hung up), where merge_streams' own cleanup would wait for garbage collection.
            stream.abort()
        yield SSE_DONE

    @staticmethod
    def _delta_logprobs(
        c: CompletionOutput, start: int, num_top: int | None
    ) -> ChatLogprobs | None:
        if num_top is None or c.logprobs is None:
            return None
        ids = c.token_ids[start:]
        return ChatLogprobs(
            content=chat_logprobs(ids, c.logprobs[start : len(c.token_ids)], num_top)
        )


def _chunk_json(chunk: ChatCompletionChunk, include_usage: bool) -> str:
    """OpenAI's chunk shape: a delta carries only the keys it sets; ``usage`` appears only when
    the client asked for it (null until the final usage chunk)."""
    data = chunk.model_dump(mode="json")
    for choice in data["choices"]:
        choice["delta"] = chunk_delta(choice["delta"])
    if not include_usage:
        data.pop("usage", None)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def chunk_delta(delta: dict[str, Any]) -> dict[str, Any]:
    """Only the keys a delta sets, also inside its tool calls."""
    out = {k: v for k, v in delta.items() if v is not None}
    if "tool_calls" in out:
        out["tool_calls"] = [
            {
                **{k: v for k, v in call.items() if v is not None and k != "function"},
                "function": {k: v for k, v in call["function"].items() if v is not None},
            }
            for call in out["tool_calls"]
        ]
    return out
