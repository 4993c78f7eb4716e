"""Deadlines for reading a request, so a client that trickles (or stops sending) its headers or
body cannot hold a connection, a handler or the shutdown drain for ever (slowloris).

    header_timeout_protocol   uvicorn's HTTP protocol, closing a connection (408) whose request
                              headers are not complete within the deadline; uvicorn has none
    BodyReadTimeout           ASGI middleware: 408 JSON when the body is not all in within the
                              deadline, 503 JSON at once when the server starts draining
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from pagedllm.entrypoints.openai.errors import error_body
from pagedllm.entrypoints.openai.middleware import ServerState

# How often a pending body read looks at the deadline and the drain flag.
POLL_INTERVAL_S = 0.1


def _raw_408(message: str) -> bytes:
    body = json.dumps(error_body(message, 408, code="request_timeout")).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def header_timeout_protocol(timeout: float) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's protocol that starts a timer whenever it waits for a request's
    headers (at connect, and when a kept-alive connection's next request begins) and closes the
    connection if they are not complete when it fires."""
    base: Any = AutoHTTPProtocol

    class HeaderTimeoutProtocol(base):
        _header_timer: asyncio.TimerHandle | None = None
        _armed_cycle: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._armed_cycle = self.cycle
            self._header_timer = self.loop.call_later(timeout, self._on_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the next request on a kept-alive connection
            super().data_received(data)
            if self.cycle is not self._armed_cycle:
                self._disarm()  # its headers are in: a request cycle began

        def _on_timeout(self) -> None:
            self._header_timer = None
            if self.cycle is self._armed_cycle and not self.transport.is_closing():
                self.transport.write(_raw_408(f"request headers not received within {timeout:g} s"))
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


class BodyReadTimeout:
    def __init__(self, app: ASGIApp, state: ServerState, timeout: float) -> None:
        self.app = app
        self.state = state
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.timeout
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()  # e.g. a watcher waiting for the disconnect
            task = asyncio.ensure_future(receive())
            try:
                while True:
                    done, _ = await asyncio.wait({task}, timeout=POLL_INTERVAL_S)
                    if done:
                        message = task.result()
                        if message["type"] != "http.request" or not message.get("more_body"):
                            body_done = True
                        return message
                    # Raised inside the route's body read; the HTTPException handler answers.
                    if self.state.draining:
                        raise HTTPException(503, "the server is shutting down")
                    if time.monotonic() >= deadline:
                        raise HTTPException(
                            408, f"request body not received within {self.timeout:g} s"
                        )
            finally:
                if not task.done():
                    task.cancel()

        await self.app(scope, timed_receive, send)
