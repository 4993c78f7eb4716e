"""A fake OpenAI-compatible streaming server for the bench client's tests.

It generates no text: it streams ``max_tokens`` tokens with controlled delays (TTFT, then a
fixed gap per chunk), reports ``usage`` when asked, records every request body and the peak
number of streams in flight. A prompt containing FAIL gets an HTTP 500.

Run standalone (for the sweep's server-start path): ``python fake_openai_server.py --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL_ID = "fake-model"


@dataclass
class FakeState:
    ttft_s: float = 0.0
    itl_s: float = 0.0
    tokens_per_chunk: int = 1
    empty_first_text: bool = False  # the first token decodes to no text (a special token)
    send_usage: bool = True
    payloads: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        state.auth_headers.append(request.headers.get("authorization"))
        return await _handle(state, await request.json(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        state.auth_headers.append(request.headers.get("authorization"))
        return await _handle(state, await request.json(), chat=True)

    return app


async def _handle(state: FakeState, body: dict[str, Any], chat: bool) -> Any:
    state.payloads.append(body)
    text = json.dumps(body.get("messages") if chat else body.get("prompt"))
    if "FAIL" in text:
        return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
    num_tokens = int(body["max_tokens"])
    prompt_tokens = len(text.split())
    want_usage = state.send_usage and (body.get("stream_options") or {}).get("include_usage")
    return StreamingResponse(
        _stream(state, num_tokens, prompt_tokens, chat, bool(want_usage)),
        media_type="text/event-stream",
    )


async def _stream(state: FakeState, num_tokens: int, prompt_tokens: int, chat: bool, usage: bool):
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        created = int(time.time())
        if chat:  # OpenAI sends the role first, with empty content: not a token
            yield _event(
                {
                    "object": "chat.completion.chunk",
                    "created": created,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                }
            )
        await asyncio.sleep(state.ttft_s)
        sent = 0
        while sent < num_tokens:
            if sent:
                await asyncio.sleep(state.itl_s)
            n = min(state.tokens_per_chunk, num_tokens - sent)
            sent += n
            text = "".join(f" t{i}" for i in range(sent - n, sent))
            if sent == n and state.empty_first_text:
                text = ""
            finish = "length" if sent == num_tokens else None
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": text}
            else:
                choice["text"] = text
            yield _event({"created": created, "choices": [choice]})
        if usage:
            yield _event(
                {
                    "created": created,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": num_tokens,
                        "total_tokens": prompt_tokens + num_tokens,
                    },
                }
            )
        yield "data: [DONE]\n\n"
    finally:
        state.in_flight -= 1


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft", type=float, default=0.0)
    parser.add_argument("--itl", type=float, default=0.0)
    ns = parser.parse_args()
    app = make_app(FakeState(ttft_s=ns.ttft, itl_s=ns.itl))
    uvicorn.run(app, host=ns.host, port=ns.port, log_level="warning")


if __name__ == "__main__":
    main()
