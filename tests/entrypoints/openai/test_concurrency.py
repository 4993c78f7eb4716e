"""Serving under load on the tiny model: 32 concurrent streams batched with exact usage, client
disconnects (streaming and not) aborting their requests and freeing KV blocks at once, and
/health staying fast while the engine is busy."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time

import httpx
import openai
import pytest

from tests.entrypoints.openai.utils import (
    get_metric,
    run_server,
    slow_engine_factory,
    tokenize,
    wait_until,
)

NUM_STREAMS = 32


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    # Steps of at least 3 ms (the tiny model can be faster), so a test acting while a request
    # generates (disconnect, health probes) never races the end of the generation.
    args = [tiny_llama_dir, "--kv-cache-memory", str(32 * 2**20)]
    with run_server(args, slow_engine_factory(0.003)) as handle:
        yield handle


def idle(url: str) -> bool:
    return (
        get_metric(url, "pagedllm:num_requests_running") == 0
        and get_metric(url, "pagedllm:num_requests_waiting") == 0
        and get_metric(url, "pagedllm:kv_cache_usage_perc") == 0.0
    )


def test_32_concurrent_streams_batched_with_exact_usage(server, tiny_llama_dir):
    prompts = [f"hello world {i} " + "fox " * (i % 7) for i in range(NUM_STREAMS)]
    expected_prompt_tokens = [len(tokenize(server.url, p)) for p in prompts]
    chat_messages = [[{"role": "user", "content": p}] for p in prompts]
    expected_chat_tokens = [len(tokenize(server.url, messages=m)) for m in chat_messages]
    success_before = get_metric(server.url, "pagedllm:request_success_total")
    gen_before = get_metric(server.url, "pagedllm:generation_tokens_total")

    async def completion_stream(client, i):
        stream = await client.completions.create(
            model=tiny_llama_dir,
            prompt=prompts[i],
            max_tokens=40 + i,
            temperature=1.0,
            seed=i,
            logprobs=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": i % 2 == 0},
        )
        num_tokens, usage = 0, None
        async for chunk in stream:
            for c in chunk.choices:
                num_tokens += len(c.logprobs.tokens) if c.logprobs else 0
            usage = chunk.usage or usage
        return expected_prompt_tokens[i], num_tokens, usage

    async def chat_stream(client, i):
        stream = await client.chat.completions.create(
            model=tiny_llama_dir,
            messages=chat_messages[i],
            max_tokens=40 + i,
            seed=i,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        num_tokens, usage = 0, None
        async for chunk in stream:
            for c in chunk.choices:
                num_tokens += len(c.logprobs.content) if c.logprobs else 0
            usage = chunk.usage or usage
        return expected_chat_tokens[i], num_tokens, usage

    async def poll_running(stop: asyncio.Event, seen: list[float]):
        async with httpx.AsyncClient(base_url=server.url) as http:
            while not stop.is_set():
                text = (await http.get("/metrics")).text
                for line in text.splitlines():
                    if line.startswith("pagedllm:num_requests_running{"):
                        seen.append(float(line.rsplit(" ", 1)[1]))
                await asyncio.sleep(0.005)

    async def go():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        stop, seen = asyncio.Event(), []
        poller = asyncio.create_task(poll_running(stop, seen))
        jobs = [
            (completion_stream if i % 2 == 0 else chat_stream)(client, i)
            for i in range(NUM_STREAMS)
        ]
        results = await asyncio.wait_for(asyncio.gather(*jobs), timeout=120)
        stop.set()
        await poller
        return results, seen

    results, seen = asyncio.run(go())
    total_generated = 0
    for expected_prompt, num_tokens, usage in results:
        assert usage is not None
        assert usage.prompt_tokens == expected_prompt
        assert usage.completion_tokens == num_tokens > 0
        assert usage.total_tokens == expected_prompt + num_tokens
        total_generated += num_tokens
    print("running seen", sorted(set(seen)), len(seen))
    assert max(seen) > 1, f"never saw more than one running request: {sorted(set(seen))}"
    wait_until(lambda: idle(server.url), 10, "the engine to go idle")
    success = get_metric(server.url, "pagedllm:request_success_total")
    assert success - success_before == NUM_STREAMS
    generated = get_metric(server.url, "pagedllm:generation_tokens_total") - gen_before
    assert generated == total_generated


def test_stream_disconnect_aborts_and_frees_blocks(server, tiny_llama_dir):
    wait_until(lambda: idle(server.url), 10, "the engine to be idle")
    aborted_before = get_metric(
        server.url, "pagedllm:request_success_total", finished_reason="abort"
    )
    body = {
        "model": tiny_llama_dir,
        "prompt": "The quick brown fox",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            assert get_metric(server.url, "pagedllm:kv_cache_usage_perc") > 0
        # Leaving the block closes the connection mid-stream.
    wait_until(lambda: idle(server.url), 5, "the aborted request to free its KV blocks")
    aborted = get_metric(server.url, "pagedllm:request_success_total", finished_reason="abort")
    assert aborted == aborted_before + 1


def test_non_streaming_disconnect_aborts(server, tiny_llama_dir):
    wait_until(lambda: idle(server.url), 10, "the engine to be idle")
    aborted_before = get_metric(
        server.url, "pagedllm:request_success_total", finished_reason="abort"
    )
    host, port = server.url.removeprefix("http://").split(":")
    payload = json.dumps(
        {"model": tiny_llama_dir, "prompt": "hello world", "max_tokens": 450, "ignore_eos": True}
    ).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        wait_until(
            lambda: get_metric(server.url, "pagedllm:num_requests_running") == 1,
            10,
            "the request to start running",
        )
    wait_until(lambda: idle(server.url), 5, "the abandoned request to be aborted")
    aborted = get_metric(server.url, "pagedllm:request_success_total", finished_reason="abort")
    assert aborted == aborted_before + 1


def test_health_is_fast_while_generating(server, tiny_llama_dir):
    wait_until(lambda: idle(server.url), 10, "the engine to be idle")
    body = {
        "model": tiny_llama_dir,
        "prompt": "hello world",
        "max_tokens": 480,
        "ignore_eos": True,
        "stream": True,
        "n": 4,
    }
    latencies = []
    with (
        httpx.Client(base_url=server.url, timeout=30) as http,
        httpx.Client(base_url=server.url, timeout=5) as probe,
    ):
        with http.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            for _ in range(9):
                assert get_metric(server.url, "pagedllm:num_requests_running") >= 1
                start = time.perf_counter()
                assert probe.get("/health").status_code == 200
                latencies.append(time.perf_counter() - start)
    print("health latencies", latencies)
    assert statistics.median(latencies) < 0.1, latencies
    wait_until(lambda: idle(server.url), 5, "the engine to go idle")


def test_small_request_is_not_stuck_behind_a_fanned_out_one(server):
    """One call of 64 prompts x n=4 (256 sequences, every seat of max_num_seqs 256) must not
    keep a 4-token chat sent after it waiting until all of them finish."""
    big = {
        "prompt": [f"story {i}" for i in range(64)],
        "n": 4,
        "max_tokens": 150,  # all 256 fit the KV cache: no preemption frees a seat
        "ignore_eos": True,
        "temperature": 1.0,
    }
    small = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    done: dict[str, float] = {}
    running_after_small: list[float] = []

    async def go() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:

            async def send(name: str, path: str, body: dict) -> None:
                resp = await client.post(path, json=body)
                assert resp.status_code == 200, resp.text
                done[name] = time.monotonic()

            big_task = asyncio.ensure_future(send("big", "/completions", big))
            while get_metric(server.url, "pagedllm:num_requests_running") < 100:
                await asyncio.sleep(0.01)
                assert not big_task.done()
            await send("small", "/chat/completions", small)
            # ignore_eos: the big call's sequences all end at the same step, so the small one
            # was not stuck behind them only if they are still running now.
            running_after_small.append(get_metric(server.url, "pagedllm:num_requests_running"))
            await big_task

    asyncio.run(go())
    assert done["small"] < done["big"]
    assert running_after_small[0] >= 100
    wait_until(lambda: idle(server.url), 10, "the server to idle")
