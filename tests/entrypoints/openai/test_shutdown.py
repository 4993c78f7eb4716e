"""Start-up and shutdown of a real server process: the start-up report (KV blocks, maximum
concurrency, URL), SIGTERM draining a stream in progress and exiting 0, SIGINT, the shutdown
timeout aborting what is left, a model that fails to load, 503 while loading, and --help."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest

from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.entrypoints.cli import main as cli_main
from pagedllm.entrypoints.openai.api_server import build_server
from pagedllm.entrypoints.openai.cli_args import config_from_namespace, make_arg_parser
from tests.entrypoints.openai.utils import (
    QUIET,
    run_server,
    run_server_process,
    slow_engine_factory,
    wait_healthy,
    wait_until,
)

MAX_TOKENS = 480  # the tiny model's context is 512
LONG = {
    "prompt": "hello world",
    "max_tokens": MAX_TOKENS,
    "ignore_eos": True,
    "stream": True,
    "stream_options": {"include_usage": True},
}


def data_events(lines) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def test_sigterm_drains_stream_then_exits_zero(tiny_llama_dir):
    # A generous timeout: the stream must finish on its own even on a busy machine.
    args = [tiny_llama_dir, "--kv-cache-memory", str(16 * 2**20), "--shutdown-timeout", "300"]
    with run_server_process(args) as (proc, url, lines):
        wait_healthy(url, alive=lambda: proc.poll() is None)
        ready_line = f"serving {tiny_llama_dir} on {url}"
        wait_until(lambda: ready_line in "".join(lines), 10, "the ready line")
        startup = "".join(lines)
        assert "# KV blocks:" in startup
        assert "Maximum concurrency for 512 tokens per request" in startup

        with httpx.stream("POST", url + "/v1/completions", json=LONG, timeout=60) as resp:
            assert resp.status_code == 200
            events = resp.iter_lines()
            first = next(e for e in events if e.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            # Draining: new requests and /health get 503 while the stream goes on.
            wait_until(
                lambda: httpx.get(url + "/health", timeout=5).status_code == 503,
                10,
                "/health to turn 503",
            )
            refused = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=5)
            assert refused.status_code == 503
            # not ready (no new traffic) but alive (no restart while it drains)
            assert httpx.get(url + "/ready", timeout=5).json()["error"]["code"] == "shutting_down"
            assert httpx.get(url + "/live", timeout=5).status_code == 200
            assert refused.json()["error"]["code"] == "shutting_down"
            rest = data_events([first, *events])
        assert rest[-1] == "[DONE]"
        usage = json.loads(rest[-2])["usage"]
        assert usage["completion_tokens"] == MAX_TOKENS
        finish = [json.loads(e)["choices"][0]["finish_reason"] for e in rest[:-2]]
        assert finish[-1] == "length"
        assert proc.wait(timeout=60) == 0
    assert "drained" in "".join(lines)


def test_sigint_when_idle_exits_zero(tiny_llama_dir):
    with run_server_process([tiny_llama_dir, "--kv-cache-memory", "8000000"]) as (proc, url, _):
        wait_healthy(url, alive=lambda: proc.poll() is None)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_model_that_fails_to_load_exits_nonzero(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with run_server_process([missing]) as (proc, url, lines):
        assert proc.wait(timeout=60) == 1
    assert "does not exist" in "".join(lines)


def test_shutdown_timeout_fails_leftover_requests_with_503(tiny_llama_dir):
    args = [
        tiny_llama_dir,
        "--kv-cache-memory",
        "8000000",
        "--shutdown-timeout",
        "0.3",
        "--max-num-seqs",
        "1",
    ]
    whole = {k: v for k, v in LONG.items() if k not in ("stream", "stream_options")}
    results = {}
    # ~10 ms a step: the stream far outlasts the 0.3 s shutdown timeout.
    with run_server(args, slow_engine_factory(0.01)) as srv:
        with httpx.stream("POST", srv.base_url + "/completions", json=LONG, timeout=60) as resp:
            events = resp.iter_lines()
            first = next(e for e in events if e.startswith("data: "))
            # A second request, never scheduled: the only seat is the stream's.
            queued = threading.Thread(
                target=lambda: results.update(
                    queued=httpx.post(srv.base_url + "/completions", json=whole, timeout=60)
                )
            )
            queued.start()
            wait_until(lambda: srv.engine.stats.num_waiting == 1, 10, "the request to queue")
            srv.server.begin_drain()  # what SIGTERM does (signals reach only the main thread)
            rest = data_events([first, *events])
        queued.join(timeout=30)
        srv.thread.join(timeout=30)
        assert not srv.thread.is_alive()
    # The stream ends with an error event, not a 200-looking finish_reason "abort".
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["code"] == "shutting_down" and "shut down" in error["message"]
    assert all(json.loads(e)["choices"][0]["finish_reason"] != "abort" for e in rest[:-2])
    resp = results["queued"]
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "shutting_down"


def test_503_while_the_model_loads(tiny_llama_dir):
    release = threading.Event()

    def slow_factory(args: EngineArgs) -> LLMEngine:
        assert release.wait(60)
        return LLMEngine(args)

    ns = make_arg_parser().parse_args(
        [tiny_llama_dir, "--port", "0", "--kv-cache-memory", "8000000", *QUIET]
    )
    server, sock = build_server(*config_from_namespace(ns), engine_factory=slow_factory)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "uvicorn to start")
        for path in ("/health", "/ready", "/v1/models"):
            resp = httpx.get(server.url + path, timeout=5)
            assert resp.status_code == 503
            assert resp.json()["error"]["code"] == "model_loading"
        # alive while loading: a liveness probe must not restart a slow load
        assert httpx.get(server.url + "/live", timeout=5).status_code == 200
        assert httpx.get(server.url + "/metrics", timeout=5).status_code == 200
        release.set()
        wait_healthy(server.url, alive=thread.is_alive)
        assert httpx.get(server.url + "/v1/models", timeout=5).status_code == 200
        assert httpx.get(server.url + "/ready", timeout=5).status_code == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_serve_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["serve", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--host",
        "--port",
        "--api-key",
        "--served-model-name",
        "--chat-template",
        "--uvicorn-log-level",
        "--shutdown-timeout",
        "--max-model-len",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--block-size",
        "--kv-cache-memory",
        "--gpu-memory-utilization",
        "--enable-prefix-caching",
        "--dtype",
        "--seed",
    ):
        assert flag in text, flag
