"""Clients that trickle or stall their request: headers not complete in time are cut off with a
408 (slowloris), a body not all in within its deadline gets a 408 JSON error, and a body still
pending when the drain starts gets a 503 at once instead of holding the shutdown."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

from tests.entrypoints.openai.utils import run_server, wait_until

PARTIAL_HEADERS = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/js"


def connect(url: str) -> socket.socket:
    parsed = urlparse(url)
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=30)
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """One HTTP response (headers, then Content-Length bytes of body), however it is split."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {raw!r}"
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return status_and_json(head + b"\r\n\r\n" + body)


def half_body_request(url: str) -> socket.socket:
    """A completion request whose body stops halfway (Content-Length promises more)."""
    body = json.dumps({"prompt": "hello", "max_tokens": 2}).encode()
    sock = connect(url)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[: len(body) // 2]
    )
    return sock


def test_slowloris_connections_are_closed(tiny_llama_dir):
    args = [tiny_llama_dir, "--kv-cache-memory", "8000000", "--header-read-timeout", "1"]
    with run_server(args) as srv:
        socks = [connect(srv.url) for _ in range(50)]
        for i, sock in enumerate(socks):
            if i % 2:
                sock.sendall(PARTIAL_HEADERS)  # the rest never comes; the others send nothing
        t0 = time.monotonic()
        for sock in socks:
            status, body = status_and_json(read_all(sock))  # returns once the server closes
            assert status == 408 and body["error"]["code"] == "request_timeout"
            sock.close()
        assert time.monotonic() - t0 < 15
        # A complete request on a kept-alive connection is unaffected by the timer.
        sock = connect(srv.url)
        for _ in range(2):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(1.5)  # past the header deadline, idle between requests: still open
        sock.close()


def test_stalled_body_gets_408(tiny_llama_dir):
    args = [tiny_llama_dir, "--kv-cache-memory", "8000000", "--body-read-timeout", "1"]
    with run_server(args) as srv:
        sock = half_body_request(srv.url)
        t0 = time.monotonic()
        status, body = read_response(sock)
        assert status == 408, body
        assert body["error"]["code"] == "request_timeout"
        assert 0.9 < time.monotonic() - t0 < 10
        sock.close()


def test_stalled_body_does_not_hold_the_drain(tiny_llama_dir):
    # The drain and the body deadline are both long: only the drain cutting the read ends it.
    args = [
        tiny_llama_dir,
        "--kv-cache-memory",
        "8000000",
        "--shutdown-timeout",
        "300",
        "--body-read-timeout",
        "300",
    ]
    with run_server(args) as srv:
        sock = half_body_request(srv.url)
        wait_until(lambda: srv.app_state.server.num_inflight == 1, 10, "the request to arrive")
        t0 = time.monotonic()
        srv.server.begin_drain()
        status, body = read_response(sock)
        assert status == 503 and body["error"]["code"] == "shutting_down", body
        sock.close()
        srv.thread.join(timeout=30)
        assert not srv.thread.is_alive()
        assert time.monotonic() - t0 < 15
