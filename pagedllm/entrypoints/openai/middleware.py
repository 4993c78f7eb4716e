"""Pure-ASGI middleware in front of the routes (pure ASGI, unlike BaseHTTPMiddleware, leaves
streaming responses and client disconnects alone):

    RequestGate      503 while loading or draining; counts in-flight requests for the drain
    APIKeyAuth       401 unless ``Authorization: Bearer <key>`` on /v1/*, /tokenize, /detokenize
    BodySizeLimit    413 for a body over the limit, from Content-Length or while reading
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedllm.entrypoints.openai.errors import error_body

# Routes that answer while the model loads or the server drains, and never need a key.
OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})


@dataclass
class ServerState:
    """Mutable per-app state shared by the gate, the routes and the drain (one event loop)."""

    draining: bool = False
    num_inflight: int = 0


async def send_error(
    send: Send,
    status_code: int,
    message: str,
    code: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(error_body(message, status_code, code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGate:
    def __init__(self, app: ASGIApp, state: ServerState, is_loading: Callable[[], bool]) -> None:
        self.app = app
        self.state = state
        self.is_loading = is_loading

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] not in OPEN_PATHS:
            if self.state.draining:
                await send_error(send, 503, "the server is shutting down", "shutting_down")
                return
            if self.is_loading():
                await send_error(send, 503, "the model is still loading", "model_loading")
                return
        self.state.num_inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.num_inflight -= 1


def is_protected(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


class APIKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        # NOTE: constant-time comparison, so response timing does not leak the key.
        if not hmac.compare_digest(given, self.expected):
            await send_error(
                send,
                401,
                "invalid or missing API key: send 'Authorization: Bearer <key>'",
                "invalid_api_key",
                headers=[(b"www-authenticate", b"Bearer")],
            )
            return
        await self.app(scope, receive, send)


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0  # the HTTP parser rejects a malformed length itself
                if declared > self.max_bytes:
                    await send_error(send, 413, self._message(), "request_too_large")
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read; the HTTPException handler answers.
                    raise HTTPException(status_code=413, detail=self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body too large: the limit is {self.max_bytes} bytes"
