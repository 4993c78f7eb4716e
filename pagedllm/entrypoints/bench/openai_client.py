"""One streamed request to any OpenAI-compatible server, timed chunk by chunk.

Works with pagedllm's server, ``vllm serve`` and llama.cpp's ``llama-server``: it only relies on
the OpenAI wire format (SSE ``data:`` lines, ``choices[0].text`` or ``choices[0].delta.content``,
an optional final ``usage`` chunk, ``data: [DONE]``). Servers that ignore ``ignore_eos`` or
``stream_options`` still work; the token count then falls back to the number of token chunks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from pagedllm.entrypoints.bench.datasets import BenchRequest

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT_COMPLETIONS)


@dataclass(frozen=True)
class ApiTarget:
    """Where and how requests are sent (shared by every request of a run)."""

    base_url: str
    endpoint: str
    model: str
    ignore_eos: bool = True
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(
                f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}"
            )

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint


@dataclass
class RequestResult:
    """What one request measured. Times are seconds; ``itl`` holds every inter-chunk gap."""

    success: bool = False
    error: str = ""
    prompt_len: int | None = None  # from the server's usage, else the dataset's figure
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0  # end to end
    itl: list[float] = field(default_factory=list)
    start_time: float = 0.0  # perf_counter at send

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (0 for one-token outputs)."""
        if self.output_tokens < 2:
            return 0.0
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def build_payload(target: ApiTarget, request: BenchRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": target.model,
        "max_tokens": request.output_len,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.endpoint == CHAT_COMPLETIONS:
        if not isinstance(request.prompt, str):
            raise ValueError("the chat endpoint needs text prompts, not token ids")
        payload["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        payload["prompt"] = request.prompt
    if target.ignore_eos:
        # Not OpenAI's: vLLM and pagedllm honour it; llama.cpp ignores unknown fields.
        payload["ignore_eos"] = True
    return payload


async def send_request(
    client: httpx.AsyncClient,
    target: ApiTarget,
    request: BenchRequest,
    headers: dict[str, str] | None = None,
) -> RequestResult:
    """Stream one request; never raises for server or network failures (they go in ``error``)."""
    result = RequestResult(prompt_len=request.prompt_len)
    payload = build_payload(target, request)
    result.start_time = start = time.perf_counter()
    last = start
    num_chunks = 0
    usage_tokens: int | None = None
    try:
        async with client.stream("POST", target.url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {body[:500]}"
                return result
            async for line in response.aiter_lines():
                data = _sse_data(line)
                if data is None:
                    continue
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    continue
                if "error" in chunk:
                    result.error = f"error in stream: {chunk['error']}"
                    return result
                now = time.perf_counter()
                if _is_token_chunk(chunk, target.endpoint):
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    num_chunks += 1
                usage = chunk.get("usage") or {}
                if usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
                if usage.get("prompt_tokens") is not None:
                    result.prompt_len = int(usage["prompt_tokens"])
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens is not None else num_chunks
    if num_chunks == 0:
        result.error = "the stream carried no generated tokens"
        return result
    result.success = True
    return result


def _sse_data(line: str) -> str | None:
    if not line.startswith("data:"):
        return None  # blank separators, comments (": ping"), event:/id: fields
    return line[len("data:") :].strip()


def _is_token_chunk(chunk: dict[str, Any], endpoint: str) -> bool:
    """Does this chunk deliver generated tokens? As in vLLM's client, a choice counts even with
    empty text (a special token, or the end of the stream); only a chat stream's role
    announcement, which servers may send before generating anything, does not."""
    choices = chunk.get("choices") or []
    if not choices:
        return False  # the usage chunk
    if endpoint == CHAT_COMPLETIONS:
        delta = choices[0].get("delta") or {}
        content = delta.get("content") or delta.get("reasoning_content")
        return not ("role" in delta and not content)
    return True


async def fetch_model_id(
    client: httpx.AsyncClient, base_url: str, headers: dict[str, str] | None = None
) -> str:
    """The first model the server lists at GET /v1/models."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        response = await client.get(url, headers=headers)
        response.raise_for_status()
        models = response.json().get("data") or []
    except (httpx.HTTPError, ValueError) as exc:
        raise ValueError(f"could not list models at {url} ({exc}); pass --model") from None
    if not models or "id" not in models[0]:
        raise ValueError(f"{url} lists no model; pass --model")
    return str(models[0]["id"])
