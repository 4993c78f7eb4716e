"""Admission control and deadlines (a real server on the tiny model, steps slowed to 20 ms so
requests stay queued): a burst of 100 requests at --max-num-seqs 4 and --max-waiting-requests
8 gets 429s with OpenAI's error JSON and a Retry-After header for what does not fit, the rest
complete, and the rejections are counted; a request past --request-timeout (or the client's
own X-Stainless-Timeout) is aborted and answered 504 (streams: an error event), its KV blocks
freed; the server serves normally afterwards."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.entrypoints.openai.utils import get_metric, run_server, slow_engine_factory, wait_idle

BODY = {"prompt": "hello world", "max_tokens": 20, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    args = [tiny_llama_dir, "--kv-cache-memory", str(32 * 2**20), "--max-num-seqs", "4"]
    args += ["--max-waiting-requests", "8", "--request-timeout", "30"]
    with run_server(args, slow_engine_factory(0.02)) as handle:
        yield handle


def test_a_burst_past_the_queue_bound_gets_429_with_retry_after(server):
    before = get_metric(server.url, "pagedllm:request_rejected_total", reason="queue_full")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(
                *(client.post("/v1/completions", json=BODY) for _ in range(100))
            )

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    ok = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(rejected) == 100, sorted(set(statuses))
    assert len(ok) >= 8 and rejected
    for r in ok:
        assert r.json()["usage"]["completion_tokens"] == 20
    for r in rejected:
        error = r.json()["error"]
        assert error["code"] == "queue_full" and "--max-waiting-requests 8" in error["message"]
        assert 1 <= int(r.headers["Retry-After"]) <= 60
    after = get_metric(server.url, "pagedllm:request_rejected_total", reason="queue_full")
    assert after - before == len(rejected)
    wait_idle(server.url)
    assert httpx.post(server.url + "/v1/completions", json=BODY, timeout=60).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_deadline_is_aborted_with_504(server, stream):
    before = get_metric(server.url, "pagedllm:request_rejected_total", reason="timeout")
    body = {**BODY, "max_tokens": 400, "stream": stream}  # ~8 s at 20 ms a step
    headers = {"X-Stainless-Timeout": "1.0"}  # the openai client's own timeout, in seconds
    t0 = time.monotonic()
    resp = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60)
    assert time.monotonic() - t0 < 5
    if stream:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
    else:
        assert resp.status_code == 504
        error = resp.json()["error"]
    assert error["code"] == "request_timeout" and "deadline" in error["message"]
    after = get_metric(server.url, "pagedllm:request_rejected_total", reason="timeout")
    assert after - before == 1
    wait_idle(server.url)  # aborted: its blocks are free again


def test_bad_client_timeouts_are_ignored_and_the_server_deadline_holds(server):
    for value in ("soon", "-3", "0"):
        resp = httpx.post(
            server.url + "/v1/completions",
            json=BODY,
            headers={"X-Stainless-Timeout": value},
            timeout=60,
        )
        assert resp.status_code == 200
