"""Security at the edge: with --api-key every route the app has (found from the app itself, so a
new route is covered the day it is added) needs the key but the probes; CORS is off unless
--allowed-origins names origins; prompt text reaches the logs only with --enable-log-requests."""

from __future__ import annotations

import logging

import httpx
import pytest

from pagedllm.entrypoints.openai.cli_args import config_from_namespace, make_arg_parser
from pagedllm.entrypoints.openai.middleware import NO_KEY_PATHS
from tests.entrypoints.openai.utils import run_server

KV = ["--kv-cache-memory", str(8 * 2**20)]
MARKER = "zebra-quartz-17"


@pytest.fixture(scope="module")
def keyed(tiny_llama_dir):
    args = [tiny_llama_dir, "--api-key", "k3y", "--enable-lora", *KV]
    with run_server([*args, "--allowed-origins", "https://app.example"]) as handle:
        yield handle


def test_every_route_needs_the_key(keyed):
    # every route in the app's own OpenAPI schema, and the schema and docs pages themselves
    paths = keyed.server.config.app.openapi()["paths"]
    routes = [(m.upper(), p) for p, ops in paths.items() for m in ops]
    routes += [("GET", p) for p in ("/openapi.json", "/docs", "/redoc")]
    checked = set()
    for method, route in routes:
        path = route.replace("{model_id}", "x")
        resp = httpx.request(method, keyed.url + path, json={}, timeout=30)
        if route in NO_KEY_PATHS:
            assert resp.status_code != 401, path
            continue
        assert resp.status_code == 401, (method, path, resp.status_code)
        assert resp.json()["error"]["code"] == "invalid_api_key"
        checked.add(route)
    assert {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/score",
        "/v1/load_lora_adapter",
        "/tokenize",
        "/metrics",
        "/docs",
    } <= checked


def test_cors_allows_only_the_listed_origins(keyed):
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    ok = httpx.options(
        keyed.url + "/v1/completions", headers={"Origin": "https://app.example", **preflight}
    )
    assert ok.status_code == 200  # answered before the key check: preflights carry no key
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(
        keyed.url + "/v1/completions", headers={"Origin": "https://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers
    plain = httpx.get(keyed.url + "/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in plain.headers


def test_cors_off_by_default(tiny_llama_dir, caplog):
    caplog.set_level(logging.DEBUG)
    with run_server([tiny_llama_dir, *KV]) as handle:
        resp = httpx.options(
            handle.url + "/v1/completions",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in resp.headers
        get = httpx.get(handle.url + "/v1/models", headers={"Origin": "https://app.example"})
        assert get.status_code == 200 and "access-control-allow-origin" not in get.headers
        # and no prompt text in the logs without --enable-log-requests
        body = {"prompt": f"tell me about {MARKER}", "max_tokens": 2}
        assert httpx.post(handle.url + "/v1/completions", json=body, timeout=60).status_code == 200
    assert MARKER not in caplog.text


def test_log_requests_logs_the_prompt(tiny_llama_dir, caplog):
    caplog.set_level(logging.INFO, logger="pagedllm.requests")
    args = [tiny_llama_dir, *KV, "--enable-log-requests", "--max-log-len", "40"]
    with run_server(args) as handle:
        body = {"prompt": f"tell me about {MARKER} " + "x" * 100, "max_tokens": 2}
        assert httpx.post(handle.url + "/v1/completions", json=body, timeout=60).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "pagedllm.requests"]
    assert len(lines) == 1 and MARKER in lines[0]
    assert "x" * 30 not in lines[0]  # cut at --max-log-len


def test_credentials_with_any_origin_is_refused():
    ns = make_arg_parser().parse_args(["m", "--allowed-origins", "*", "--allow-credentials"])
    with pytest.raises(ValueError, match="allow-credentials"):
        config_from_namespace(ns)
    ns = make_arg_parser().parse_args(
        ["m", "--allowed-origins", '["https://a.example", "https://b.example"]']
    )
    assert config_from_namespace(ns)[0].allowed_origins == (
        "https://a.example",
        "https://b.example",
    )
