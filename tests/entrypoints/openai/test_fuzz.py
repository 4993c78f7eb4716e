"""Fuzzing against the server's own OpenAPI schema (schemathesis + hypothesis): for every route
it lists, generated requests (valid and not) must get a 2xx, or a 4xx with OpenAI's error JSON:
never a 5xx, never a hang. Over 1,000 requests in a few seconds; then a normal request still
succeeds, nothing is left running and every KV block is free."""

from __future__ import annotations

import httpx
from hypothesis import HealthCheck, Phase, given, settings

from tests.entrypoints.openai.utils import run_server, wait_idle

EXAMPLES_PER_ROUTE = 100


def _content_type(resp) -> str:
    value = resp.headers.get("content-type") or [""]
    return value[0] if isinstance(value, list) else value


def test_fuzz_every_route(tiny_llama_dir):
    import schemathesis

    args = [
        tiny_llama_dir,
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "64",  # keeps generated max_tokens short: the run stays bounded
        "--kv-cache-memory",
        str(8 * 2**20),
        "--enable-lora",
        "--allow-runtime-lora-updating",
    ]
    with run_server(args) as handle:
        schema = schemathesis.openapi.from_url(handle.url + "/openapi.json")
        sent, problems, routes = 0, [], []
        for result in schema.get_all_operations():
            operation = result.ok()
            routes.append(operation.label)

            @given(case=operation.as_strategy())
            @settings(
                max_examples=EXAMPLES_PER_ROUTE,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def check(case):
                nonlocal sent
                sent += 1
                resp = case.call(base_url=handle.url, timeout=60)
                if resp.status_code < 400:
                    return
                body = resp.json() if _content_type(resp).startswith("application/json") else None
                if resp.status_code >= 500 or not (isinstance(body, dict) and "error" in body):
                    problems.append((case.operation.label, resp.status_code, resp.text[:300]))

            check()
        assert not problems, problems[:5]
        assert sent >= 1000, sent
        assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/embeddings"} <= set(
            routes
        )
        ok = httpx.post(
            handle.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 4}, timeout=60
        )
        assert ok.status_code == 200, ok.text
        wait_idle(handle.url)
        assert handle.engine.stats.num_running == 0 and handle.engine.stats.num_waiting == 0
        assert handle.engine.stats.kv_cache_usage == 0.0
