"""The official openai client (sync and async) against a real server on the tiny model:
non-streaming and streaming chat and completions, streamed deltas == whole text for one seed,
greedy output == LLM.generate, n > 1 and several prompts, logprobs, echo, stop strings, the
tokenizer endpoints and the small GET routes."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from pagedllm.entrypoints.llm import LLM, apply_chat_template
from pagedllm.sampling_params import SamplingParams
from tests.entrypoints.openai.utils import get_metric, run_server, tokenize

PROMPT = "The quick brown fox jumps over"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Paged attention keeps the KV cache in blocks."},
]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with run_server([tiny_llama_dir, "--kv-cache-memory", str(32 * 2**20)]) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


@pytest.fixture
def async_client(server):
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, kv_cache_memory=8 * 2**20)


def test_models_lists_served_name(client, server, tiny_llama_dir):
    models = client.models.list()
    assert [m.id for m in models.data] == [tiny_llama_dir]
    assert client.models.retrieve(tiny_llama_dir).id == tiny_llama_dir
    card = httpx.get(server.base_url + "/models").json()["data"][0]
    assert card["max_model_len"] == 512


def test_completion_greedy_matches_llm_generate(client, server, llm, tiny_llama_dir):
    resp = client.completions.create(
        model=tiny_llama_dir,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    [expected] = llm.generate(
        PROMPT, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )
    choice = resp.choices[0]
    assert resp.object == "text_completion"
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == "length"
    assert (
        resp.usage.prompt_tokens
        == len(tokenize(server.url, PROMPT))
        == len(expected.prompt_token_ids)
    )
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12


def test_chat_greedy_matches_llm_chat(client, server, llm, tiny_llama_dir):
    resp = client.chat.completions.create(
        model=tiny_llama_dir, messages=MESSAGES, max_completion_tokens=10, temperature=0.0
    )
    [expected] = llm.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)
    assert resp.object == "chat.completion"
    msg = resp.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == expected.outputs[0].text
    assert resp.choices[0].finish_reason == expected.outputs[0].finish_reason
    _, prompt_ids = apply_chat_template(llm.get_tokenizer(), MESSAGES)
    assert (
        resp.usage.prompt_tokens == len(prompt_ids) == len(tokenize(server.url, messages=MESSAGES))
    )
    assert resp.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_streamed_completion_equals_whole(client, tiny_llama_dir):
    kwargs = dict(model=tiny_llama_dir, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=7)
    whole = client.completions.create(**kwargs)
    stream = client.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert text == whole.choices[0].text
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_streamed_chat_equals_whole_async(async_client, tiny_llama_dir):
    async def go():
        kwargs = dict(
            model=tiny_llama_dir, messages=MESSAGES, max_tokens=24, temperature=0.9, seed=11
        )
        whole = await async_client.chat.completions.create(**kwargs)
        stream = await async_client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        return whole, chunks

    whole, chunks = asyncio.run(go())
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == ""
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_raw_stream_ends_with_done(server, tiny_llama_dir):
    body = {"model": tiny_llama_dir, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_several_prompts_and_n(client, server, tiny_llama_dir):
    prompts = [PROMPT, "hello world", "0123456789"]
    resp = client.completions.create(
        model=tiny_llama_dir, prompt=prompts, n=2, max_tokens=6, temperature=1.0, seed=3
    )
    assert [c.index for c in resp.choices] == list(range(6))
    # Each prompt's choices equal the same prompt sent alone with the same seed.
    for p_idx, prompt in enumerate(prompts):
        alone = client.completions.create(
            model=tiny_llama_dir, prompt=prompt, n=2, max_tokens=6, temperature=1.0, seed=3
        )
        for s_idx in range(2):
            assert resp.choices[p_idx * 2 + s_idx].text == alone.choices[s_idx].text
    num_prompt = sum(len(tokenize(server.url, p)) for p in prompts)
    assert resp.usage.prompt_tokens == num_prompt
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streamed_n_and_prompts_equal_whole(client, tiny_llama_dir):
    kwargs = dict(
        model=tiny_llama_dir, prompt=[PROMPT, "hello"], n=2, max_tokens=10, temperature=1.0, seed=5
    )
    whole = client.completions.create(**kwargs)
    texts = {i: "" for i in range(4)}
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]


def test_completion_logprobs_format(client, tiny_llama_dir):
    resp = client.completions.create(
        model=tiny_llama_dir,
        prompt=PROMPT,
        max_tokens=8,
        logprobs=3,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 8
    assert len(lp.top_logprobs) == 8
    assert all(x <= 0.0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 4 for top in lp.top_logprobs)
    # Greedy: the sampled token is the most likely one.
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[tok] == pytest.approx(logprob) and logprob == pytest.approx(max(top.values()))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_logprobs_format(client, tiny_llama_dir):
    resp = client.chat.completions.create(
        model=tiny_llama_dir,
        messages=MESSAGES,
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 5
    for entry in content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.bytes == list(entry.token.encode())


def test_echo_and_stop_string(client, tiny_llama_dir):
    base = (
        client.completions.create(
            model=tiny_llama_dir,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    echoed = (
        client.completions.create(
            model=tiny_llama_dir,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0.0,
            echo=True,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    assert echoed == PROMPT + base
    stop = base[3:6]
    assert stop and stop in base
    stopped = client.completions.create(
        model=tiny_llama_dir,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0.0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert stopped.text == base[: base.index(stop)]
    assert stopped.finish_reason == "stop"


def test_token_id_prompts(client, server, tiny_llama_dir):
    ids = tokenize(server.url, PROMPT)
    many = client.completions.create(
        model=tiny_llama_dir, prompt=[ids, [5, 6, 7]], max_tokens=3, temperature=0.0
    )
    assert [c.index for c in many.choices] == [0, 1]
    assert many.usage.prompt_tokens == len(ids) + 3
    by_ids = client.completions.create(
        model=tiny_llama_dir, prompt=ids, max_tokens=6, temperature=0.0
    )
    by_text = client.completions.create(
        model=tiny_llama_dir, prompt=PROMPT, max_tokens=6, temperature=0.0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_tokenize_detokenize_roundtrip(server):
    resp = httpx.post(
        server.url + "/tokenize", json={"prompt": PROMPT, "return_token_strs": True}
    ).json()
    assert resp["count"] == len(resp["tokens"]) == len(resp["token_strs"])
    assert resp["max_model_len"] == 512
    back = httpx.post(server.url + "/detokenize", json={"tokens": resp["tokens"]}).json()
    assert back == {"prompt": PROMPT}


def test_health_version_metrics(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json() == {"version": "0.1.0"}
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200
    for name in (
        "pagedllm:num_requests_running",
        "pagedllm:num_requests_waiting",
        "pagedllm:kv_cache_usage_perc",
        "pagedllm:prompt_tokens_total",
        "pagedllm:generation_tokens_total",
        "pagedllm:request_success_total",
        "pagedllm:num_preemptions_total",
        "pagedllm:prefix_cache_queries_total",
        "pagedllm:prefix_cache_hits_total",
        "pagedllm:time_to_first_token_seconds_bucket",
        "pagedllm:time_per_output_token_seconds_bucket",
        "pagedllm:e2e_request_latency_seconds_bucket",
    ):
        assert name in metrics.text, name


def test_chat_template_flag(tiny_llama_dir, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    args = [tiny_llama_dir, "--chat-template", str(template), "--kv-cache-memory", "8000000"]
    with run_server(args) as srv:
        tokens = tokenize(srv.url, messages=[{"role": "user", "content": "hi"}])
        text = httpx.post(srv.url + "/detokenize", json={"tokens": tokens}).json()["prompt"]
        assert text == "[user]hi\n[assistant]"
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        resp = client.chat.completions.create(
            model=tiny_llama_dir, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert resp.usage.prompt_tokens == len(tokens)


def test_http_responses_counted_by_route_and_status(server):
    def count(handler: str, status: str) -> float:
        return get_metric(server.url, "http_requests_total", handler=handler, status=status)

    ok, bad, unknown = (
        count("/v1/completions", "2xx"),
        count("/v1/completions", "4xx"),
        count("none", "4xx"),
    )
    httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": -1})
    httpx.get(server.url + "/no/such/route/42")
    assert count("/v1/completions", "2xx") == ok + 1
    assert count("/v1/completions", "4xx") == bad + 1
    assert count("none", "4xx") == unknown + 1  # unknown paths share one series


def test_metrics_prefix_vllm_and_both(tiny_llama_dir):
    """--metrics-prefix vllm: vLLM's own names (its dashboards work unchanged); both: each."""
    for prefix, present, absent in (
        ("vllm", ["vllm:"], ["pagedllm:"]),
        ("both", ["vllm:", "pagedllm:"], []),
    ):
        args = [tiny_llama_dir, "--kv-cache-memory", "8000000", "--metrics-prefix", prefix]
        with run_server(args) as srv:
            httpx.post(srv.base_url + "/completions", json={"prompt": "hi", "max_tokens": 3})
            for p in present:
                assert get_metric(srv.url, f"{p}generation_tokens_total") == 3
                assert get_metric(srv.url, f"{p}request_success_total") == 1
            text = httpx.get(srv.url + "/metrics").text
            for p in absent:
                assert f"{p}num_requests_running" not in text


def test_client_hangups_are_not_counted_as_errors():
    from pagedllm.entrypoints.openai.metrics import PrometheusStatLogger
    from tests.entrypoints.openai.utils import parse_metrics

    stats = PrometheusStatLogger("m")
    for status in (200, 404, 499, 499, 503):
        stats.record_http("/v1/completions", "POST", status)
    samples = parse_metrics(stats.render()[0].decode())
    by_status = {
        dict(labels)["status"]: v
        for (name, labels), v in samples.items()
        if name == "http_requests_total"
    }
    assert by_status == {"2xx": 1, "4xx": 1, "499": 2, "5xx": 1}
