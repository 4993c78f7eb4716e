"""The soak in short form (benchmarks/soak.py's loop for 15 s on the tiny model): 64 clients,
random lengths, streams hanging up at random, clients giving up early; no error answers, and
afterwards nothing runs and every KV block is free."""

from __future__ import annotations

import asyncio

from benchmarks.soak import soak
from tests.entrypoints.openai.utils import get_metric, run_server, wait_idle


def test_short_soak_leaves_nothing_behind(tiny_llama_dir):
    args = [tiny_llama_dir, "--kv-cache-memory", str(8 * 2**20)]
    with run_server(args) as handle:
        result = asyncio.run(soak(handle.url, duration=15.0, concurrency=64, max_prompt_words=50))
        assert not result.errors, result.errors[:5]
        assert result.sent > 100 and result.completed > 50, result
        assert result.disconnected > 10 and result.timed_out > 5, result
        wait_idle(handle.url, timeout=30)
        assert get_metric(handle.url, "pagedllm:num_requests_running") == 0
        kv = handle.engine.stats
        assert kv.kv_cache_usage == 0.0 and kv.num_running == 0 and kv.num_waiting == 0
