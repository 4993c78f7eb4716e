"""``pagedllm serve --tensor-parallel-size 2`` (a real server process, its worker a process of
its own): the official client gets the single-rank engine's greedy answers; killing the worker
mid-stream ends the stream with an error event, /health turns 500 and the server exits 1 (a
supervisor restarts it), all within a bounded time."""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import openai
import pytest

from pagedllm import LLM, SamplingParams
from tests.entrypoints.openai.utils import run_server_process, wait_healthy, wait_until

PROMPTS = ["hello world", "The quick brown fox", "Paged attention keeps", "0123"]


def test_tp2_server_answers_like_tp1_and_fails_cleanly_when_a_worker_dies(tiny_llama_dir):
    with LLM(tiny_llama_dir, dtype="float32", kv_cache_memory=2**24) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        want = [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    args = [tiny_llama_dir, "--dtype", "float32", "--tensor-parallel-size", "2"]
    args += ["--served-model-name", "tiny"]
    with run_server_process([*args, "--kv-cache-memory", str(2**24)]) as (proc, url, lines):
        wait_healthy(url, alive=lambda: proc.poll() is None)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for prompt, text in zip(PROMPTS, want):
            got = client.completions.create(
                model="tiny",
                prompt=prompt,
                max_tokens=16,
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
            assert got.choices[0].text == text
        found = [re.search(r"worker pids \[(\d+)\]", line) for line in lines]
        worker = int(next(m for m in found if m).group(1))

        stream = client.completions.create(
            model="tiny",
            prompt="hello",
            max_tokens=400,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        next(chunks)  # streaming
        t0 = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="worker"):
            for _ in chunks:
                pass
        assert time.monotonic() - t0 < 30

        def unhealthy() -> bool:
            try:
                return httpx.get(url + "/health", timeout=5).status_code == 500
            except httpx.TransportError:
                return False

        wait_until(unhealthy, 15, "/health to answer 500")
        after = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=30)
        assert after.status_code == 500 and "error" in after.json()
        assert proc.wait(timeout=30) == 1
    assert time.monotonic() - t0 < 60
