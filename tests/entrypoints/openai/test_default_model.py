"""The real default model (SmolLM2-135M-Instruct GGUF) over HTTP: served under its name, greedy
chat and completion answers equal to LLM.chat / LLM.generate, streamed chat equal to the whole
answer for one seed, and /health fast while it generates. max_tokens stays small: ~50-100 ms
per token on a CPU."""

from __future__ import annotations

import statistics
import time

import httpx
import openai
import pytest

from pagedllm.entrypoints.llm import LLM
from pagedllm.model_executor.loader import DEFAULT_MODEL_NAME
from pagedllm.sampling_params import SamplingParams
from tests.entrypoints.openai.utils import run_server

MAX_MODEL_LEN = 1024
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(default_gguf):
    # No model argument: the embedded default model (default_gguf makes sure it is cached).
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", str(64 * 2**20)]
    with run_server(args) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def llm(default_gguf):
    return LLM(default_gguf, max_model_len=MAX_MODEL_LEN, kv_cache_memory=64 * 2**20)


def test_served_name_is_default_model(client):
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL_NAME]


def test_greedy_chat_and_completion_match_llm(client, llm):
    chat = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0.0
    )
    [expected_chat] = llm.chat(
        MESSAGES, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False
    )
    assert chat.choices[0].message.content == expected_chat.outputs[0].text
    assert chat.usage.prompt_tokens == len(expected_chat.prompt_token_ids)
    assert chat.usage.completion_tokens == len(expected_chat.outputs[0].token_ids)

    prompt = "The capital of France is"
    completion = client.completions.create(
        model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0.0
    )
    [expected] = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    assert completion.choices[0].text == expected.outputs[0].text
    assert completion.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_streamed_chat_equals_whole(client):
    kwargs = dict(model=DEFAULT_MODEL_NAME, messages=MESSAGES, max_tokens=8, seed=1234)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kwargs, stream=True)
        if c.choices
    )
    assert streamed == whole


def test_health_fast_while_generating(server):
    # Long enough to outlast the probes on any CPU (bf16 runs ~5 ms/token here); closing the
    # stream afterwards aborts the rest.
    body = {"prompt": "Once upon a time", "max_tokens": 800, "ignore_eos": True, "stream": True}
    latencies = []
    with (
        httpx.Client(base_url=server.url, timeout=60) as http,
        httpx.Client(base_url=server.url, timeout=5) as probe,
    ):
        with http.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            for _ in range(7):
                assert server.engine.stats.num_running == 1
                start = time.perf_counter()
                assert probe.get("/health").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.05)  # spread the probes over several engine steps
    assert statistics.median(latencies) < 0.1, latencies
    deadline = time.monotonic() + 10
    while server.engine.stats.num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.stats.num_running == 0  # the closed stream was aborted
