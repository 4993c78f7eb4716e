"""Every malformed request gets its documented 4xx and OpenAI's error JSON (never a 500, never a
traceback) and the server keeps serving; --api-key guards every route but /health and /version;
an engine failure fails in-flight requests and turns /health to 500."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.entrypoints.openai.cli_args import config_from_namespace, make_arg_parser
from tests.entrypoints.openai.utils import run_server, wait_until

MAX_REQUEST_BYTES = 64 * 1024
MODEL = "tiny"  # --served-model-name
GOOD_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    args = [
        tiny_llama_dir,
        "--served-model-name",
        MODEL,
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        "--kv-cache-memory",
        str(16 * 2**20),
    ]
    with run_server(args) as handle:
        yield handle


def cmpl(**fields):
    return ("POST", "/v1/completions", {"model": MODEL, "prompt": "hello", **fields})


def chat(**fields):
    return ("POST", "/v1/chat/completions", {"model": MODEL, "messages": GOOD_MESSAGES, **fields})


def non_finite(path: str, field: str, literal: str) -> tuple[str, str, bytes]:
    """A request whose ``field`` is a bare JSON literal json.dumps would not write (NaN)."""
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": GOOD_MESSAGES}
    return ("POST", path, json.dumps(base)[:-1].encode() + f', "{field}": {literal}}}'.encode())


# (id, (method, path, JSON body or raw bytes), expected status, expected param or None)
CASES = [
    ("invalid-json", ("POST", "/v1/completions", b'{"prompt": '), 400, None),
    ("json-array-body", ("POST", "/v1/completions", b"[1, 2]"), 400, None),
    ("empty-body", ("POST", "/v1/completions", b""), 400, None),
    ("deeply-nested-json", ("POST", "/v1/completions", b"[" * 30000 + b"]" * 30000), 400, None),
    ("missing-prompt", ("POST", "/v1/completions", {"model": MODEL}), 400, "prompt"),
    ("prompt-wrong-type", cmpl(prompt=123), 400, "prompt"),
    ("prompt-mixed-list", cmpl(prompt=["a", 1]), 400, "prompt"),
    ("empty-prompt", cmpl(prompt=""), 400, "prompt"),
    ("empty-prompt-list", cmpl(prompt=[]), 400, "prompt"),
    ("empty-token-list", cmpl(prompt=[[]]), 400, "prompt"),
    ("token-out-of-vocab", cmpl(prompt=[5, 99999]), 400, None),
    ("negative-max-tokens", cmpl(max_tokens=-1), 400, "max_tokens"),
    ("zero-max-tokens", cmpl(max_tokens=0), 400, "max_tokens"),
    ("string-max-tokens", cmpl(max_tokens="16"), 400, "max_tokens"),
    ("float-max-tokens", cmpl(max_tokens=1.5), 400, "max_tokens"),
    ("over-max-model-len", cmpl(max_tokens=600), 400, "max_tokens"),
    ("negative-temperature", cmpl(temperature=-0.5), 400, "temperature"),
    ("huge-temperature", cmpl(temperature=5), 400, "temperature"),
    ("string-temperature", cmpl(temperature="hot"), 400, "temperature"),
    ("top-p-zero", cmpl(top_p=0), 400, "top_p"),
    ("top-p-above-one", cmpl(top_p=1.5), 400, "top_p"),
    ("top-k-negative", cmpl(top_k=-5), 400, "top_k"),
    ("n-zero", cmpl(n=0), 400, "n"),
    ("n-too-large", cmpl(n=17), 400, "n"),
    ("presence-penalty", cmpl(presence_penalty=3.0), 400, "presence_penalty"),
    ("repetition-penalty", cmpl(repetition_penalty=0), 400, "repetition_penalty"),
    ("min-tokens-over-max", cmpl(min_tokens=10, max_tokens=5), 400, "min_tokens"),
    ("unknown-model", cmpl(model="gpt-4"), 400, "model"),
    ("unknown-field", cmpl(frobnicate=True), 400, "frobnicate"),
    ("logprobs-too-many", cmpl(logprobs=50), 400, "logprobs"),
    ("stop-not-strings", cmpl(stop=[1, 2]), 400, "stop"),
    ("stop-empty-string", cmpl(stop=[""]), 400, "stop"),
    ("stop-too-many", cmpl(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    ("stop-too-long", cmpl(stop=["x" * 1025]), 400, "stop"),
    ("seed-string", cmpl(seed="abc"), 400, "seed"),
    # Values that would only fail inside an engine step (and take the engine down with them).
    ("seed-beyond-int64", cmpl(seed=2**70), 400, "seed"),
    ("stop-token-out-of-vocab", cmpl(stop_token_ids=[99999]), 400, "stop_token_ids"),
    ("lone-surrogate-prompt", ("POST", "/v1/completions", b'{"prompt": "\\ud800"}'), 400, None),
    (
        "stream-options-without-stream",
        cmpl(stream_options={"include_usage": True}),
        400,
        "stream_options",
    ),
    ("suffix", cmpl(suffix="x"), 400, "suffix"),
    ("best-of", cmpl(best_of=3), 400, "best_of"),
    ("logit-bias", cmpl(logit_bias={"5": 1.0}), 400, "logit_bias"),
    ("echo-with-logprobs", cmpl(echo=True, logprobs=1), 400, "echo"),
    ("chat-missing-messages", ("POST", "/v1/chat/completions", {"model": MODEL}), 400, "messages"),
    ("chat-empty-messages", chat(messages=[]), 400, "messages"),
    ("chat-messages-not-list", chat(messages="hi"), 400, "messages"),
    (
        "chat-unknown-role",
        chat(messages=[{"role": "wizard", "content": "x"}]),
        400,
        "messages.0.role",
    ),
    ("chat-message-no-role", chat(messages=[{"content": "x"}]), 400, "messages.0.role"),
    (
        "chat-image-content",
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ]
        ),
        400,
        "messages.0.content.0.type",
    ),
    (
        "chat-audio-content",
        chat(
            messages=[
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}}]}
            ]
        ),
        400,
        "messages.0.content.0.type",
    ),
    (
        "chat-unknown-part",
        chat(messages=[{"role": "user", "content": [{"type": "hologram"}]}]),
        400,
        "messages.0.content.0.type",
    ),
    (
        "chat-text-part-without-text",
        chat(messages=[{"role": "user", "content": [{"type": "text", "txt": "hi"}]}]),
        400,
        "messages.0.content.0.text",
    ),
    # Tool turns and tools the tiny model's (non-ChatML) template cannot render: a 400, never
    # silently dropped.
    (
        "chat-assistant-tool-calls",
        chat(
            messages=[
                *GOOD_MESSAGES,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}],
                },
            ]
        ),
        400,
        "messages",
    ),
    (
        "chat-assistant-tool-calls-without-name",
        chat(
            messages=[
                *GOOD_MESSAGES,
                {"role": "assistant", "tool_calls": [{"id": "c1", "function": {}}]},
            ]
        ),
        400,
        "messages.1.tool_calls.0.function",
    ),
    (
        "chat-tool-message",
        chat(messages=[*GOOD_MESSAGES, {"role": "tool", "tool_call_id": "c1", "content": "4"}]),
        400,
        "messages",
    ),
    (
        "tokenize-tool-message",
        ("POST", "/tokenize", {"messages": [{"role": "tool", "content": "4"}]}),
        400,
        "messages",
    ),
    (
        "chat-function-call",
        chat(messages=[{"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}]),
        400,
        "messages.0.function_call",
    ),
    ("chat-tool-choice-without-tools", chat(tool_choice="auto"), 400, "tool_choice"),
    (
        "chat-parallel-tool-calls-without-tools",
        chat(parallel_tool_calls=True),
        400,
        "parallel_tool_calls",
    ),
    # NaN and Infinity (the JSON parser accepts the literals) and absurd magnitudes.
    *(
        (f"{path}-{field}-{literal}", non_finite(path, field, literal), 400, field)
        for path, field, literal in (
            ("/v1/completions", "temperature", "NaN"),
            ("/v1/chat/completions", "temperature", "NaN"),
            ("/v1/completions", "repetition_penalty", "NaN"),
            ("/v1/completions", "repetition_penalty", "Infinity"),
            ("/v1/completions", "top_p", "NaN"),
            ("/v1/completions", "presence_penalty", "-Infinity"),
            ("/v1/completions", "min_p", "NaN"),
            ("/v1/chat/completions", "frequency_penalty", "NaN"),
        )
    ),
    ("tiny-repetition-penalty", cmpl(repetition_penalty=1e-300), 400, "repetition_penalty"),
    ("huge-repetition-penalty", cmpl(repetition_penalty=1e300), 400, "repetition_penalty"),
    # One call may not fan out into more sequences than --max-seqs-per-request (256).
    ("fan-out-prompts-times-n", cmpl(prompt=["hi"] * 32, n=16), 400, "prompt"),
    ("chat-top-logprobs-without-logprobs", chat(top_logprobs=2), 400, "top_logprobs"),
    ("chat-top-logprobs-too-many", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("chat-negative-max-completion-tokens", chat(max_completion_tokens=-3), 400, "max_tokens"),
    ("chat-over-max-model-len", chat(max_tokens=10000), 400, "max_tokens"),
    ("chat-tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("chat-n-too-large", chat(n=100), 400, "n"),
    ("tokenize-neither", ("POST", "/tokenize", {}), 400, "prompt"),
    (
        "tokenize-both",
        ("POST", "/tokenize", {"prompt": "a", "messages": GOOD_MESSAGES}),
        400,
        "prompt",
    ),
    ("detokenize-negative", ("POST", "/detokenize", {"tokens": [-1]}), 400, None),
    ("detokenize-wrong-type", ("POST", "/detokenize", {"tokens": "abc"}), 400, "tokens"),
    ("unknown-route", ("GET", "/v1/nope", None), 404, None),
    ("unknown-root-route", ("POST", "/nope", {}), 404, None),
    ("unknown-model-retrieve", ("GET", "/v1/models/gpt-4", None), 404, "model"),
    ("wrong-method", ("GET", "/v1/completions", None), 405, None),
    ("wrong-method-health", ("POST", "/health", {}), 405, None),
    ("body-too-large", ("POST", "/v1/completions", b"x" * (MAX_REQUEST_BYTES + 1)), 413, None),
]


def send(url: str, method: str, path: str, body, headers: dict | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json", **(headers or {})}
    if isinstance(body, bytes):
        return httpx.request(method, url + path, content=body, headers=headers, timeout=30)
    if body is None:
        return httpx.request(method, url + path, headers=headers, timeout=30)
    return httpx.request(method, url + path, json=body, headers=headers, timeout=30)


def assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert "Traceback" not in resp.text
    return error


def assert_still_serving(url: str) -> None:
    resp = send(url, *cmpl(max_tokens=2))
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] >= 1


def test_table_has_enough_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_request(server, case):
    _, (method, path, body), status, param = case
    error = assert_openai_error(send(server.url, method, path, body), status)
    if param is not None:
        assert error["param"] == param, error
    assert_still_serving(server.url)


def test_chunked_body_too_large(server):
    def chunks():
        for _ in range(MAX_REQUEST_BYTES // 1024 + 2):
            yield b" " * 1024

    resp = httpx.post(
        server.url + "/v1/completions",
        content=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert_openai_error(resp, 413)
    assert_still_serving(server.url)


def test_non_json_content_type(server):
    resp = httpx.post(
        server.url + "/v1/completions",
        content=b'{"prompt": "hello"}',
        headers={"Content-Type": "text/plain"},
        timeout=30,
    )
    assert_openai_error(resp, 400)


def test_openai_client_sees_bad_request(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100000)
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length" in info.value.message


# ---- API key -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_server(tiny_llama_dir):
    with run_server([tiny_llama_dir, "--api-key", "s3cret", "--kv-cache-memory", "8000000"]) as h:
        yield h


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", {"messages": GOOD_MESSAGES, "max_tokens": 2}),
        ("POST", "/tokenize", {"prompt": "hi"}),
        ("POST", "/detokenize", {"tokens": [5]}),
    ],
)
def test_api_key_required(keyed_server, method, path, body):
    url = keyed_server.url
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "Bearer s3cret2"},
    ):
        error = assert_openai_error(send(url, method, path, body, headers), 401)
        assert error["code"] == "invalid_api_key"
    ok = send(url, method, path, body, {"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200, ok.text


def test_api_key_leaves_only_the_probes_open(keyed_server):
    url = keyed_server.url
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/version").status_code == 200
    # The metrics, the OpenAPI schema and the docs pages need the key too.
    for path in ("/metrics", "/openapi.json", "/docs", "/redoc"):
        error = assert_openai_error(httpx.get(url + path), 401)
        assert error["code"] == "invalid_api_key"
        ok = httpx.get(url + path, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, (path, ok.text)


def test_bearer_scheme_is_case_insensitive(keyed_server):
    for scheme in ("bearer", "BEARER", "Bearer"):
        resp = httpx.get(
            keyed_server.url + "/v1/models", headers={"Authorization": f"{scheme} s3cret"}
        )
        assert resp.status_code == 200, scheme
    resp = httpx.get(keyed_server.url + "/v1/models", headers={"Authorization": "Basic s3cret"})
    assert_openai_error(resp, 401)


def test_no_redirect_echoes_the_host_header(server):
    resp = httpx.post(
        server.url + "/tokenize/",
        json={"prompt": "hi"},
        headers={"Host": "evil.example"},
        follow_redirects=False,
    )
    assert_openai_error(resp, 404)
    assert "location" not in resp.headers


def test_metrics_api_key(tiny_llama_dir):
    args = [tiny_llama_dir, "--api-key", "k1", "--metrics-api-key", "m1"]
    with run_server([*args, "--kv-cache-memory", "8000000"]) as srv:
        metrics = srv.url + "/metrics"
        assert httpx.get(metrics, headers={"Authorization": "Bearer m1"}).status_code == 200
        assert_openai_error(httpx.get(metrics, headers={"Authorization": "Bearer k1"}), 401)
        models = srv.base_url + "/models"
        assert httpx.get(models, headers={"Authorization": "Bearer k1"}).status_code == 200
        assert_openai_error(httpx.get(models, headers={"Authorization": "Bearer m1"}), 401)


def test_ignored_openai_fields_are_accepted(server):
    extra = {"store": False, "metadata": {"team": "a"}, "service_tier": "auto", "user": "u1"}
    for method, path, body in (cmpl(max_tokens=2, **extra), chat(max_tokens=2, **extra)):
        resp = send(server.url, method, path, body)
        assert resp.status_code == 200, resp.text


def test_prompt_too_long_by_characters_is_refused_before_tokenizing(server):
    tokenizer = server.app_state.tokenizer
    limit = tokenizer.max_prompt_chars
    assert limit < MAX_REQUEST_BYTES - 100, "the case needs a body under the size limit"
    calls = []
    real_run = tokenizer._run

    async def counting_run(size, fn):
        calls.append(size)
        return await real_run(size, fn)

    tokenizer._run = counting_run
    try:
        for method, path, body in (
            cmpl(prompt="a" * (limit + 1)),
            chat(messages=[{"role": "user", "content": "a" * (limit + 1)}]),
            ("POST", "/tokenize", {"prompt": "a" * (limit + 1)}),
        ):
            error = assert_openai_error(send(server.url, method, path, body), 400)
            assert error["code"] == "context_length_exceeded", error
            assert "characters" in error["message"]
        assert calls == []
    finally:
        del tokenizer._run
    assert_still_serving(server.url)


def test_api_key_with_openai_client(keyed_server):
    good = openai.OpenAI(base_url=keyed_server.base_url, api_key="s3cret", max_retries=0)
    assert (
        good.completions.create(
            model=keyed_server.engine.info.model, prompt="hi", max_tokens=2
        ).usage.completion_tokens
        >= 1
    )
    bad = openai.OpenAI(base_url=keyed_server.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("PAGEDLLM_API_KEY", "from-env")
    config, _ = config_from_namespace(make_arg_parser().parse_args([]))
    assert config.api_key == "from-env"
    config, _ = config_from_namespace(make_arg_parser().parse_args(["--api-key", "flag"]))
    assert config.api_key == "flag"
    monkeypatch.delenv("PAGEDLLM_API_KEY")
    config, _ = config_from_namespace(make_arg_parser().parse_args([]))
    assert config.api_key is None


# ---- engine failure ----------------------------------------------------------------------------
def test_engine_failure_fails_requests_and_health(tiny_llama_dir):
    """A device that fails every step: the first failures fail their requests (500,
    step_failed); after MAX_CONSECUTIVE_STEP_FAILURES in a row the engine is dead."""
    from pagedllm.engine.async_llm import MAX_CONSECUTIVE_STEP_FAILURES

    explode = threading.Event()

    def factory(args: EngineArgs) -> LLMEngine:
        engine = LLMEngine(args)
        real_step = engine.step

        def step():
            if explode.is_set():
                raise RuntimeError("simulated device failure")
            time.sleep(0.003)  # both requests must still be running when it explodes
            return real_step()

        engine.step = step
        return engine

    with run_server([tiny_llama_dir, "--kv-cache-memory", "8000000"], factory) as srv:
        body = {"prompt": "hello", "max_tokens": 480, "ignore_eos": True}
        results = {}

        def non_streaming():
            results["whole"] = httpx.post(srv.base_url + "/completions", json=body, timeout=60)

        with httpx.stream(
            "POST", srv.base_url + "/completions", json={**body, "stream": True}, timeout=60
        ) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            thread = threading.Thread(target=non_streaming)
            thread.start()
            wait_until(lambda: srv.engine.stats.num_running == 2, 10, "both requests to run")
            explode.set()
            events = [line for line in lines if line.startswith("data: ")]
        thread.join(timeout=30)
        assert events[-1] == "data: [DONE]"
        assert '"error"' in events[-2] and "simulated device failure" in events[-2]
        error = assert_openai_error(results["whole"], 500)
        assert error["type"] == "server_error" and error["code"] == "step_failed"
        # one failed step fails its requests only; the engine serves on...
        assert httpx.get(srv.url + "/health").status_code == 200
        for _ in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
            failed = httpx.post(srv.base_url + "/completions", json=body, timeout=30)
            assert_openai_error(failed, 500)
        # ...but steps failing one after another mean the device is gone: the engine is dead
        assert_openai_error(httpx.get(srv.url + "/health"), 500)
        assert assert_openai_error(httpx.get(srv.url + "/live"), 500)["code"] == "engine_dead"
        assert_openai_error(httpx.get(srv.url + "/ready"), 503)
        after = httpx.post(srv.base_url + "/completions", json=body, timeout=30)
        assert assert_openai_error(after, 500)["code"] == "engine_dead"
        # The rest of the server still answers.
        assert httpx.get(srv.url + "/metrics").status_code == 200
