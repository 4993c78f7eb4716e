#!/usr/bin/env python3
"""Soak: a running ``pagedllm serve`` under CONCURRENCY clients for DURATION seconds, with random
prompt and output lengths, streamed and whole requests, a third of the streams hanging up at a
random point, and some requests aborted by a short client timeout. Afterwards the server must
be idle with every KV block free (its own /metrics), have lost no request (every one answered
or cut off by its own client), and its RSS must have grown less than --max-rss-growth-mb.

  .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8000 [--duration 600] \\
      [--concurrency 64] [--pid PID]      # PID: the server's, for its RSS

tests/entrypoints/openai/test_soak.py runs the same loop briefly against a tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass, field

import httpx

WORDS = "the a paged attention cache block token model engine server request batch step".split()


@dataclass
class SoakResult:
    sent: int = 0
    completed: int = 0
    disconnected: int = 0  # streams the client closed early
    timed_out: int = 0  # requests the client gave up on
    errors: list[str] = field(default_factory=list)  # answers other than 2xx / a 429


async def _one(
    client: httpx.AsyncClient, url: str, rng: random.Random, out: SoakResult, max_words: int
) -> None:
    body = {
        "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))),
        "max_tokens": rng.randint(1, 48),
        "temperature": rng.choice([0.0, 0.8]),
        "ignore_eos": rng.random() < 0.5,
    }
    out.sent += 1
    roll = rng.random()
    try:
        if roll < 0.33:  # a stream that hangs up at a random point
            async with client.stream(
                "POST", url + "/v1/completions", json={**body, "stream": True}
            ) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    _bad(out, resp)
                    return
                stop_after = rng.randint(0, 8)
                seen = 0
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        seen += 1
                        if seen > stop_after:
                            out.disconnected += 1
                            return
            out.completed += 1
        elif roll < 0.43:  # a client that gives up after a short while
            try:
                resp = await client.post(url + "/v1/completions", json=body, timeout=0.05)
                if resp.status_code == 200:
                    out.completed += 1
                else:
                    _bad(out, resp)
            except httpx.TimeoutException:
                out.timed_out += 1
        else:
            resp = await client.post(url + "/v1/completions", json=body)
            if resp.status_code == 200:
                out.completed += 1
            else:
                _bad(out, resp)
    except httpx.TransportError as exc:
        out.errors.append(f"transport: {exc!r}")


def _bad(out: SoakResult, resp: httpx.Response) -> None:
    if resp.status_code != 429:  # a full queue is a valid answer under overload
        out.errors.append(f"{resp.status_code}: {resp.text[:200]}")


async def soak(
    url: str, duration: float, concurrency: int, seed: int = 0, max_prompt_words: int = 120
) -> SoakResult:
    out = SoakResult()
    deadline = time.monotonic() + duration
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < deadline:
                await _one(client, url, rng, out, max_prompt_words)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return out


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pid", type=int, default=None)
    parser.add_argument("--max-rss-growth-mb", type=float, default=200.0)
    args = parser.parse_args()
    before = rss_mb(args.pid) if args.pid else None
    t0 = time.time()
    result = asyncio.run(soak(args.url, args.duration, args.concurrency))
    idle_by = time.monotonic() + 60
    while time.monotonic() < idle_by:
        if metric(args.url, "pagedllm:num_requests_running") == 0 and (
            metric(args.url, "pagedllm:kv_cache_usage_perc") == 0.0
        ):
            break
        time.sleep(0.5)
    running = metric(args.url, "pagedllm:num_requests_running")
    usage = metric(args.url, "pagedllm:kv_cache_usage_perc")
    print(
        f"{time.time() - t0:.0f} s, concurrency {args.concurrency}: {result.sent} requests, "
        f"{result.completed} completed, {result.disconnected} streams hung up, "
        f"{result.timed_out} given up by the client, {len(result.errors)} errors"
    )
    print(f"afterwards: {running:.0f} running, KV cache usage {usage:.3f}")
    ok = not result.errors and running == 0 and usage == 0.0
    if before is not None:
        after = rss_mb(args.pid)
        print(f"server RSS {before:.0f} -> {after:.0f} MiB (+{after - before:.0f})")
        ok = ok and after - before < args.max_rss_growth_mb
    for err in result.errors[:5]:
        print("error:", err)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
