"""Helpers for the server tests: run a real server (in a thread, or as a subprocess) on
127.0.0.1 and a free port, wait for /health, read Prometheus metrics."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from pagedllm.entrypoints.openai.api_server import build_server
from pagedllm.entrypoints.openai.cli_args import config_from_namespace, make_arg_parser

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
QUIET = ["--uvicorn-log-level", "warning", "--disable-uvicorn-access-log"]


@dataclass
class ServerHandle:
    url: str
    server: Any  # GracefulServer
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def app_state(self) -> Any:
        return self.server.config.app.state

    @property
    def engine(self) -> Any:
        return self.app_state.engine


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def wait_healthy(
    url: str, timeout: float = 120.0, alive: Callable[[], bool] = lambda: True
) -> None:
    def healthy() -> bool:
        if not alive():
            raise RuntimeError("the server stopped before it became healthy")
        try:
            return httpx.get(url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, timeout, "/health to answer 200", interval=0.05)


@contextmanager
def run_server(args: list[str], engine_factory: Any = None) -> Iterator[ServerHandle]:
    """A real uvicorn server in a background thread, built exactly as ``main`` builds it."""
    ns = make_arg_parser().parse_args([*args, "--host", "127.0.0.1", "--port", "0", *QUIET])
    config, engine_args = config_from_namespace(ns)
    if engine_factory is None:
        server, sock = build_server(config, engine_args)
    else:
        server, sock = build_server(config, engine_args, engine_factory)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    handle = ServerHandle(server.url, server, thread)
    try:
        wait_healthy(handle.url, alive=thread.is_alive)
        yield handle
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def run_server_process(
    args: list[str], env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen, str, list[str]]]:
    """``python -m pagedllm.entrypoints.openai.api_server ARGS --port 0`` -> (process, url,
    output lines so far: stdout and stderr merged, filled by a reader thread)."""
    cmd = [
        sys.executable,
        "-m",
        "pagedllm.entrypoints.openai.api_server",
        *args,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--disable-uvicorn-access-log",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        url_re = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
        wait_until(
            lambda: any(url_re.search(x) for x in lines) or proc.poll() is not None,
            60,
            "the server to print its URL",
        )
        match = next((url_re.search(x) for x in lines if url_re.search(x)), None)
        assert match is not None, "".join(lines)
        yield proc, match.group(1), lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        reader.join(timeout=10)


def slow_engine_factory(delay_s: float) -> Callable[[Any], Any]:
    """An LLMEngine whose steps take at least ``delay_s`` longer, so a test that must act while
    a request is still generating does not race the (very fast) tiny model."""
    from pagedllm.engine.llm_engine import LLMEngine

    def factory(args: Any) -> Any:
        engine = LLMEngine(args)
        step = engine.step

        def slow_step():
            time.sleep(delay_s)
            return step()

        engine.step = slow_step
        return engine

    return factory


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def get_metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    text = httpx.get(url + "/metrics", timeout=10).text
    want = set(labels.items())
    return sum(v for (n, ls), v in parse_metrics(text).items() if n == name and want <= ls)


def wait_idle(url: str, timeout: float = 10.0) -> None:
    """Every request done and every KV block free again (per /metrics)."""
    wait_until(
        lambda: (
            get_metric(url, "pagedllm:num_requests_running") == 0
            and get_metric(url, "pagedllm:num_requests_waiting") == 0
            and get_metric(url, "pagedllm:kv_cache_usage_perc") == 0.0
        ),
        timeout,
        "the server to go idle with every KV block free",
    )


def tokenize(url: str, prompt: str | None = None, messages: list | None = None) -> list[int]:
    body: dict[str, Any] = {"prompt": prompt} if messages is None else {"messages": messages}
    resp = httpx.post(url + "/tokenize", json=body, timeout=30)
    resp.raise_for_status()
    return resp.json()["tokens"]
