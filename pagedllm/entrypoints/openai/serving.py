"""What /v1/completions and /v1/chat/completions share: model-name and length checks, building
SamplingParams from a request, adding prompts to the engine, merging their output streams, and
server-sent events whose request is aborted the moment the client goes away."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.llm_engine import PromptType
from pagedllm.engine.request_stream import RequestStream
from pagedllm.entrypoints.openai.errors import (
    OpenAIError,
    RequestTimeoutError,
    error_body,
    to_openai_error,
)
from pagedllm.entrypoints.openai.lora_modules import LoRAModules
from pagedllm.entrypoints.openai.protocol import (
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    SamplingRequest,
)
from pagedllm.entrypoints.openai.request_logger import RequestLogger
from pagedllm.entrypoints.openai.tokenizer import AsyncTokenizer
from pagedllm.lora import LoRARequest
from pagedllm.outputs import RequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"
# Sequences one API call may fan out into (prompts x n): --max-seqs-per-request.
DEFAULT_MAX_SEQS_PER_REQUEST = 256
# The openai client sends its own timeout (seconds) in this header.
CLIENT_TIMEOUT_HEADER = "x-stainless-timeout"
# OpenAI fields taken and ignored: they do not change the output.
IGNORED_FIELDS = ("user", "store", "metadata", "service_tier")


@dataclass
class PromptInput:
    text: str | None
    token_ids: list[int]

    def engine_prompt(self) -> dict:
        return {"prompt_token_ids": self.token_ids, "prompt": self.text}


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(data: str) -> str:
    return f"data: {data}\n\n"


def sse_error(exc: BaseException) -> str:
    """An error in the middle of a stream (the 200 status is already sent): one error event."""
    err = to_openai_error(exc)
    return sse(json.dumps(error_body(err.message, err.status_code, err.param, err.code)))


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncLLM,
        tokenizer: AsyncTokenizer,
        served_model_name: str,
        max_seqs_per_request: int = DEFAULT_MAX_SEQS_PER_REQUEST,
        request_timeout: float | None = None,
        lora_modules: LoRAModules | None = None,
        request_logger: RequestLogger | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.served_model_name = served_model_name
        self.max_seqs_per_request = max_seqs_per_request
        self.request_timeout = request_timeout
        self.lora_modules = lora_modules
        self.request_logger = request_logger
        self._warned_ignored: set[str] = set()

    def warn_ignored_fields(self, req: SamplingRequest) -> None:
        for name in IGNORED_FIELDS:
            if getattr(req, name) is not None and name not in self._warned_ignored:
                self._warned_ignored.add(name)
                logger.warning("ignoring the request field %r: it does not change the output", name)

    def deadline(self, client_timeout: str | None) -> float | None:
        """The event-loop time a request must finish by: --request-timeout, shortened by the
        client's own timeout header (ignored if it does not parse as positive seconds)."""
        timeouts = [] if self.request_timeout is None else [self.request_timeout]
        try:
            if client_timeout is not None and float(client_timeout) > 0:
                timeouts.append(float(client_timeout))
        except ValueError:
            pass
        return request_deadline(min(timeouts)) if timeouts else None

    def check_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter ``model`` names (None: the base model); 400 for another name."""
        if model is None or model == self.served_model_name:
            return None
        lora = self.lora_modules.get(model) if self.lora_modules is not None else None
        if lora is not None:
            return lora
        names = [self.served_model_name]
        if self.lora_modules is not None:
            names += list(self.lora_modules.requests)
        raise OpenAIError(
            f"the model `{model}` does not exist; this server serves "
            f"{', '.join(f'`{n}`' for n in names)}",
            400,
            param="model",
            code="model_not_found",
        )

    @staticmethod
    def response_model(served_name: str, lora: LoRARequest | None) -> str:
        """The ``model`` a response names: the adapter's name for a LoRA request."""
        return lora.lora_name if lora is not None else served_name

    def check_runner(self, runner_type: str) -> None:
        """400 for a route of the other runner: an embeddings route (``pooling``) on a server
        that generates text, or a completion / chat route (``generate``) on one that makes
        embeddings."""
        if self.engine.info.runner_type == runner_type:
            return
        why = _WRONG_RUNNER[runner_type]
        raise OpenAIError(
            f"the model `{self.served_model_name}` {why}",
            param="model",
            code="model_not_supported",
        )

    def check_fan_out(self, num_prompts: int, n: int) -> None:
        """400 before any work for a call that would become too many sequences: one such call
        would otherwise fill every seat and queue thousands of sequences ahead of everyone."""
        if num_prompts * n > self.max_seqs_per_request:
            raise OpenAIError(
                f"this request asks for {num_prompts * n} sequences ({num_prompts} prompt(s) x "
                f"n={n}); the server allows at most {self.max_seqs_per_request} per request "
                "(--max-seqs-per-request): send fewer prompts or a smaller n",
                param="n" if num_prompts == 1 else "prompt",
                code="too_many_sequences",
            )

    def base_params(
        self, req: SamplingRequest, max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
        """Validate the sampling fields (ValueError -> 400) before any tokenization work."""
        self.warn_ignored_fields(req)
        n = 1 if req.n is None else req.n
        if not 1 <= n <= MAX_N:
            raise OpenAIError(f"n must be between 1 and {MAX_N}, got {n}", param="n")
        if req.logit_bias:
            raise OpenAIError("logit_bias is not supported", param="logit_bias")
        if req.stream_options is not None and not req.stream:
            raise OpenAIError(
                "stream_options is only allowed with stream=true", param="stream_options"
            )
        if max_tokens is not None and max_tokens < 1:
            raise OpenAIError(
                f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens"
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise OpenAIError(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        if any(isinstance(s, str) and len(s) > MAX_STOP_STRING_CHARS for s in stop):
            raise OpenAIError(
                f"a stop string may have at most {MAX_STOP_STRING_CHARS} characters", param="stop"
            )
        # NOTE: values the engine would only trip over inside a step (killing the engine for
        # every request) are rejected here: seeds beyond int64, stop tokens outside the vocab.
        if req.seed is not None and not -(2**63) <= req.seed < 2**63:
            raise OpenAIError("seed must fit in a signed 64-bit integer", param="seed")
        vocab_size = self.engine.info.vocab_size
        bad_ids = [t for t in req.stop_token_ids or [] if not 0 <= t < vocab_size]
        if bad_ids:
            raise OpenAIError(
                f"stop_token_ids out of range [0, {vocab_size}): {bad_ids[:5]}",
                param="stop_token_ids",
            )
        if req.temperature is not None and req.temperature > 2.0:
            raise OpenAIError(
                f"temperature must be in [0, 2], got {req.temperature}", param="temperature"
            )

        def given(value, default):
            return default if value is None else value

        structured = structured_outputs_of(req)

        try:
            return SamplingParams(
                n=n,
                temperature=given(req.temperature, 1.0),
                top_p=given(req.top_p, 1.0),
                top_k=req.top_k,
                min_p=given(req.min_p, 0.0),
                seed=req.seed,
                presence_penalty=given(req.presence_penalty, 0.0),
                frequency_penalty=given(req.frequency_penalty, 0.0),
                repetition_penalty=given(req.repetition_penalty, 1.0),
                max_tokens=max_tokens,
                min_tokens=given(req.min_tokens, 0),
                stop=stop,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=given(req.ignore_eos, False),
                include_stop_str_in_output=given(req.include_stop_str_in_output, False),
                logprobs=logprobs,
                skip_special_tokens=given(req.skip_special_tokens, True),
                structured_outputs=structured,
            )
        except ValueError as exc:
            raise OpenAIError(str(exc), param=_param_of(str(exc))) from exc

    async def compile_structured_outputs(
        self, req: SamplingRequest, params: SamplingParams
    ) -> None:
        """Compile the request's grammar before it enters the engine, on a worker thread: a
        bad schema, regex or grammar is a 400 naming the field that carried it."""
        if params.structured_outputs is not None:
            await self.compile_grammar(params.structured_outputs, structured_outputs_param(req))

    async def compile_grammar(self, spec: StructuredOutputsParams, param: str | None) -> None:
        try:
            await self.engine.compile_structured_output(spec)
        except ValueError as exc:
            raise OpenAIError(str(exc), param=param) from exc

    def params_for_prompt(
        self, base: SamplingParams, requested_max_tokens: int | None, num_prompt_tokens: int
    ) -> SamplingParams:
        """Fix max_tokens for one prompt: 400 when prompt + max_tokens exceeds max_model_len."""
        max_model_len = self.engine.info.max_model_len
        if num_prompt_tokens == 0:
            raise OpenAIError("prompt must not be empty", param="prompt")
        if requested_max_tokens is None:
            max_tokens = max_model_len - num_prompt_tokens
            if max_tokens < 1:
                raise self._too_long(num_prompt_tokens, 1, max_model_len)
        else:
            max_tokens = requested_max_tokens
            if num_prompt_tokens + max_tokens > max_model_len:
                raise self._too_long(num_prompt_tokens, max_tokens, max_model_len)
        try:
            return dataclasses.replace(base, max_tokens=max_tokens)
        except ValueError as exc:  # e.g. min_tokens above the derived max_tokens
            raise OpenAIError(str(exc), param=_param_of(str(exc))) from exc

    @staticmethod
    def _too_long(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> OpenAIError:
        return OpenAIError(
            f"this model's maximum context length is {max_model_len} tokens, but you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion); shorten the prompt or lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )

    async def outputs(
        self, streams: list[RequestStream], deadline: float | None
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """merge_streams, counting a missed deadline as a rejection (reason ``timeout``)."""
        try:
            async for item in merge_streams(streams, deadline):
                yield item
        except RequestTimeoutError:
            self.engine.record_rejection("timeout")
            raise

    async def add_prompts(
        self,
        request_id: str,
        prompts: list[PromptInput],
        params: list[SamplingParams],
        lora_request: LoRARequest | None = None,
    ) -> list[RequestStream]:
        """Add every prompt (concurrently: one engine round trip); all or nothing."""
        return await self.add_requests(
            request_id, [p.engine_prompt() for p in prompts], params, lora_request
        )

    async def add_requests(
        self,
        request_id: str,
        prompts: list[PromptType],
        params: list[SamplingParams] | list[PoolingParams],
        lora_request: LoRARequest | None = None,
    ) -> list[RequestStream]:
        """Add engine requests ``{request_id}-{i}`` as one group, all or nothing."""
        ids = [
            request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))
        ]
        if self.request_logger is not None:
            for rid, p, sp in zip(ids, prompts, params, strict=True):
                self.request_logger.log(rid, p, sp, lora_request)
        results = await asyncio.gather(
            *(
                self.engine.add_request(rid, p, sp, group_id=request_id, lora_request=lora_request)
                for rid, p, sp in zip(ids, prompts, params, strict=True)
            ),
            return_exceptions=True,
        )
        streams = [r for r in results if isinstance(r, RequestStream)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for stream in streams:
                stream.abort()
            raise errors[0]
        return streams


# Why a route of the other runner (keyed by the runner the route needs) is refused.
_WRONG_RUNNER = {
    "pooling": "generates text and does not make embeddings: serve an embedding model "
    "(pagedllm serve MODEL --runner pooling, or --convert embed for a decoder)",
    "generate": "is served as a pooling (embedding) model and does not generate text: use "
    "/v1/embeddings (or serve a generative model without --runner pooling)",
}

# The request fields that can carry a grammar, in the order they are looked at.
STRUCTURED_FIELDS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


def structured_outputs_param(req: SamplingRequest) -> str | None:
    for name in STRUCTURED_FIELDS:
        value = getattr(req, name)
        if value is not None and not (name == "response_format" and value.type == "text"):
            return name
    return None


def structured_outputs_of(req: SamplingRequest) -> StructuredOutputsParams | None:
    """The grammar a request asks for, from whichever one field carries it (400 otherwise)."""
    given = [
        name
        for name in STRUCTURED_FIELDS
        if getattr(req, name) is not None
        and not (name == "response_format" and req.response_format.type == "text")
    ]
    if not given:
        return None
    if len(given) > 1:
        raise OpenAIError(
            f"give at most one of {', '.join(given)}: each sets the output's structure",
            param=given[1],
        )
    name = given[0]
    try:
        if name == "response_format":
            fmt = req.response_format
            if fmt.type == "json_object":
                return StructuredOutputsParams(json_object=True)
            if fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise OpenAIError(
                    "response_format of type json_schema needs json_schema.schema",
                    param="response_format.json_schema",
                )
            return StructuredOutputsParams(json=fmt.json_schema.json_schema)
        if name == "structured_outputs":
            spec = dict(req.structured_outputs)
            unknown = set(spec) - set(StructuredOutputsParams.__dataclass_fields__)
            if unknown:
                raise OpenAIError(
                    f"structured_outputs has unknown fields {sorted(unknown)}; the known ones "
                    "are json, json_object, regex, choice, grammar, disable_any_whitespace",
                    param="structured_outputs",
                )
            return StructuredOutputsParams(**spec)
        kind = name.removeprefix("guided_")
        return StructuredOutputsParams(**{kind: getattr(req, name)})
    except (ValueError, TypeError) as exc:
        raise OpenAIError(str(exc), param=name) from exc


def _param_of(message: str) -> str | None:
    """SamplingParams' messages start with the field name ("top_p must be ...")."""
    head = message.split(" ", 1)[0]
    return head if head.isidentifier() else None


def request_deadline(timeout: float | None) -> float | None:
    """The event-loop time by which a request must finish, from a timeout in seconds."""
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


async def merge_streams(
    streams: list[RequestStream], deadline: float | None = None
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as (stream index, output); aborts all on exit.
    Past ``deadline`` (event-loop time) it raises RequestTimeoutError, aborting them (their KV
    blocks are freed)."""
    if deadline is not None:
        merged = merge_streams(streams)
        try:
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                try:
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    item = await asyncio.wait_for(merged.__anext__(), remaining)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise RequestTimeoutError(
                        "the request did not finish before its deadline (--request-timeout, "
                        "or the client's X-Stainless-Timeout); it was aborted"
                    ) from None
                yield item
        finally:
            await merged.aclose()
            for stream in streams:
                stream.abort()
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].abort()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as exc:
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


async def cancel_on_disconnect(raw_request: Request, handler: Awaitable[Response]) -> Response:
    """Run a handler, cancelling it (which aborts its engine requests) if the client hangs up
    first. Streaming responses return at once and guard themselves (see SSEResponse)."""
    task = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        disconnected = not task.done() and not watcher.cancelled() and watcher.exception() is None
        if disconnected:
            task.cancel()
            # The client is gone; nobody reads this (499: nginx's "client closed request").
            return Response(status_code=499)
        return await task
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_for_disconnect(raw_request: Request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its generator, so a client that hangs
    up mid-stream has its requests aborted (and KV blocks freed) at once, not at GC time."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache"})
        self._generator = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._generator, "aclose", None)
            if aclose is not None:
                await aclose()
