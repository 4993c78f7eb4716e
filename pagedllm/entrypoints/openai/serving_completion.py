"""POST /v1/completions: prompts (text or token ids, one or many) -> choices indexed
``prompt_idx * n + sample_idx``, whole or streamed as server-sent events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response

from pagedllm.engine.request_stream import RequestStream
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.logprobs import completion_logprobs
from pagedllm.entrypoints.openai.protocol import (
    MAX_LOGPROBS,
    MAX_PROMPTS,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
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
)
from pagedllm.outputs import CompletionOutput, RequestOutput


@dataclass
class _ChoiceState:
    """How much of one choice a stream has sent."""

    num_chars: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    started: bool = False
    finished: bool = False


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, req: CompletionRequest, deadline: float | None = None) -> Response:
        lora = self.check_model(req.model)
        model = self.response_model(self.served_model_name, lora)
        self.check_runner("generate")
        self._check(req)
        base = self.base_params(req, req.max_tokens, req.logprobs)
        items = self._prompt_items(req.prompt)
        self.check_fan_out(len(items), base.n)
        await self.compile_structured_outputs(req, base)
        prompts = await self._tokenize(items)
        params = [self.params_for_prompt(base, req.max_tokens, len(p.token_ids)) for p in prompts]
        echo_texts = await self._echo_texts(req, prompts)
        request_id = random_id("cmpl")
        streams = await self.add_prompts(request_id, prompts, params, lora)
        created = int(time.time())
        if req.stream:
            return SSEResponse(
                self._stream(req, request_id, model, created, streams, echo_texts, deadline)
            )
        return await self._full(req, request_id, model, created, streams, echo_texts, deadline)

    def _check(self, req: CompletionRequest) -> None:
        if req.suffix is not None:
            raise OpenAIError("suffix is not supported", param="suffix")
        n = 1 if req.n is None else req.n
        if req.best_of is not None and req.best_of != n:
            raise OpenAIError("best_of is not supported (it must equal n)", param="best_of")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise OpenAIError(
                f"logprobs must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}",
                param="logprobs",
            )
        if req.echo and req.logprobs is not None:
            raise OpenAIError(
                "echo with logprobs is not supported (no prompt logprobs)", param="echo"
            )

    @staticmethod
    def _prompt_items(
        prompt: str | list[str] | list[int] | list[list[int]],
    ) -> list[str | list[int]]:
        items: list[str | list[int]]
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            items = [prompt]  # type: ignore[list-item]
        else:
            items = list(prompt)  # type: ignore[arg-type]
        if not items:
            raise OpenAIError("prompt must not be empty", param="prompt")
        if len(items) > MAX_PROMPTS:
            raise OpenAIError(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        return items

    async def _tokenize(self, items: list[str | list[int]]) -> list[PromptInput]:
        out = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise OpenAIError("prompt must not be an empty string", param="prompt")
                out.append(PromptInput(item, await self.tokenizer.encode(item)))
            else:
                if not item:
                    raise OpenAIError("prompt token list must not be empty", param="prompt")
                out.append(PromptInput(None, list(item)))
        return out

    async def _echo_texts(self, req: CompletionRequest, prompts: list[PromptInput]) -> list[str]:
        if not req.echo:
            return ["" for _ in prompts]
        return [
            p.text if p.text is not None else await self.tokenizer.decode(p.token_ids)
            for p in prompts
        ]

    async def _full(
        self,
        req: CompletionRequest,
        request_id: str,
        model: str,
        created: int,
        streams: list[RequestStream],
        echo_texts: list[str],
        deadline: float | None,
    ) -> Response:
        finals: dict[int, RequestOutput] = {}
        async for i, out in self.outputs(streams, deadline):
            finals[i] = out
        choices, num_prompt, num_completion = [], 0, 0
        n = len(finals[0].outputs)
        for i in range(len(streams)):
            out = finals[i]
            num_prompt += len(out.prompt_token_ids)
            for c in out.outputs:
                num_completion += len(c.token_ids)
                choices.append(self._choice(req, i * n + c.index, c, echo_texts[i]))
        response = CompletionResponse(
            id=request_id,
            created=created,
            model=model,
            choices=choices,
            usage=make_usage(num_prompt, num_completion),
        )
        return JSONResponse(response.model_dump(mode="json"))

    @staticmethod
    def _choice(
        req: CompletionRequest, index: int, c: CompletionOutput, echo: str
    ) -> CompletionChoice:
        logprobs = None
        if req.logprobs is not None and c.logprobs is not None:
            logprobs, _ = completion_logprobs(c.token_ids, c.logprobs, len(echo))
        return CompletionChoice(
            index=index,
            text=echo + c.text,
            logprobs=logprobs,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )

    async def _stream(
        self,
        req: CompletionRequest,
        request_id: str,
        model: str,
        created: int,
        streams: list[RequestStream],
        echo_texts: list[str],
        deadline: float | None,
    ) -> AsyncIterator[str]:
        n = 1 if req.n is None else req.n
        states = [
            _ChoiceState(text_offset=len(echo_texts[i // n])) for i in range(len(streams) * n)
        ]
        num_prompt: dict[int, int] = {}

        def chunk(choice: CompletionChoice) -> str:
            body = CompletionResponse(id=request_id, created=created, model=model, choices=[choice])
            return sse(body.model_dump_json(exclude={"usage"}))

        try:
            async for i, out in self.outputs(streams, deadline):
                num_prompt[i] = len(out.prompt_token_ids)
                for c in out.outputs:
                    index = i * n + c.index
                    state = states[index]
                    if state.finished:
                        continue
                    text = c.text[state.num_chars :]
                    new_ids = c.token_ids[state.num_tokens :]
                    has_news = text or c.finish_reason is not None or not state.started
                    if not has_news and (req.logprobs is None or not new_ids):
                        continue  # tokens whose text is held back (partial UTF-8, stop string)
                    if not state.started:
                        text = echo_texts[i] + text
                        state.started = True
                    logprobs = None
                    if req.logprobs is not None and c.logprobs is not None:
                        new_lps = c.logprobs[state.num_tokens : len(c.token_ids)]
                        logprobs, state.text_offset = completion_logprobs(
                            new_ids, new_lps, state.text_offset
                        )
                    state.num_chars, state.num_tokens = len(c.text), len(c.token_ids)
                    state.finished = c.finish_reason is not None
                    yield chunk(
                        CompletionChoice(
                            index=index,
                            text=text,
                            logprobs=logprobs,
                            finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason,
                        )
                    )
            if req.stream_options is not None and req.stream_options.include_usage:
                usage = make_usage(sum(num_prompt.values()), sum(s.num_tokens for s in states))
                body = CompletionResponse(
                    id=request_id,
                    created=created,
                    model=model,
                    choices=[],
                    usage=usage,
                )
                yield sse(body.model_dump_json())
        except Exception as exc:
            yield sse_error(exc)
        finally:
            # NOTE: also runs when the response closes this generator at a yield (the client
            # hung up), where merge_streams' own cleanup would wait for garbage collection.
            for stream in streams:
                stream.abort()
        yield SSE_DONE
