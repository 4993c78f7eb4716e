"""Pure-ASGI middleware in front of the routes (pure ASGI, unlike BaseHTTPMiddleware, leaves
streaming responses and client disconnects alone):

    RequestGate      503 while loading or draining; counts in-flight requests for the drain
    APIKeyAuth       401 unless ``Authorization: Bearer <key>`` on every route but /health, /version
                     (/metrics takes the metrics key where one is set)
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

# Routes that answer while the model loads or the server drains.
OPEN_PATHS = frozenset({"/health", "/live", "/ready", "/metrics", "/version"})
# Routes that never need a key: load balancers and orchestrators probe them unauthenticated.
NO_KEY_PATHS = frozenset({"/health", "/live", "/ready", "/version"})
METRICS_PATH = "/metrics"


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


class APIKeyAuth:
    """With --api-key everything but the probes needs the key (the OpenAPI schema and docs
    too: they list the routes); /metrics needs --metrics-api-key where given, else the API key,
    so Prometheus can scrape with a key of its own. The scheme name is case-insensitive."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics_api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        metrics_key = metrics_api_key or api_key
        self.metrics_api_key = metrics_key.encode() if metrics_key else None

    def _expected(self, path: str) -> bytes | None:
        if path in NO_KEY_PATHS:
            return None
        if path == METRICS_PATH:
            return self.metrics_api_key
        return self.api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        expected = self._expected(scope["path"]) if scope["type"] == "http" else None
        if expected is None:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.strip().partition(b" ")
        token = token.strip() if scheme.lower() == b"bearer" else b""
        # NOTE: constant-time comparison, so response timing does not leak the key.
        if not hmac.compare_digest(token, expected):
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


class HTTPMetrics:
    """Counts every response by route, method and status class (``record(handler, method,
    status)``), outermost so that the gate's 503s, auth's 401s and the body limit's 413s count
    too. Paths that are no route count as handler ``none`` (a scan of random paths must not
    grow the metrics without bound)."""

    def __init__(
        self, app: ASGIApp, routes: frozenset[str], record: Callable[[str, str, int], None]
    ) -> None:
        self.app = app
        self.routes = routes
        self.record = record

    def handler(self, path: str) -> str:
        if path in self.routes:
            return path
        if path.startswith("/v1/models/"):
            return "/v1/models/{model_id}"
        return "none"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler, method = self.handler(scope["path"]), scope["method"]

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.record(handler, method, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
