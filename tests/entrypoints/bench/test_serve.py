"""``bench serve`` against a fake streaming OpenAI server on 127.0.0.1: exact counts, timings
that follow the injected delays, concurrency caps, chat streams, failures and the CLI's JSON."""

from __future__ import annotations

import asyncio
import json

import pytest

from pagedllm.entrypoints.bench import main
from pagedllm.entrypoints.bench.datasets import BenchRequest, random_text_requests
from pagedllm.entrypoints.bench.openai_client import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    ApiTarget,
)
from pagedllm.entrypoints.bench.serve import LoadOptions, run_load, summarize

MODEL = "fake-model"


def _run(base_url, requests, endpoint=COMPLETIONS, **options):
    target = ApiTarget(base_url, endpoint, MODEL)
    opts = LoadOptions(disable_tqdm=True, **options)
    return asyncio.run(run_load(target, requests, opts))


def test_counts_and_timings_follow_the_server(fake_server):
    fake_server.state.ttft_s, fake_server.state.itl_s = 0.2, 0.03
    requests = random_text_requests(6, input_len=5, output_len=6, seed=0)
    results, duration = _run(fake_server.base_url, requests, max_concurrency=3)
    s = summarize(results, duration)
    assert (s["completed"], s["failed"]) == (6, 0)
    assert s["total_output_tokens"] == 36
    assert all(r.output_tokens == 6 and len(r.itl) == 5 for r in results)
    # Generous bounds: the machine may be busy, but never faster than the injected delays.
    assert 200 <= s["median_ttft_ms"] < 1200
    assert 30 <= s["median_itl_ms"] < 300
    assert 30 <= s["median_tpot_ms"] < 300
    assert s["mean_e2el_ms"] >= 200 + 5 * 30
    # Two waves of three: the cap held and the run took about two requests' time.
    assert fake_server.state.max_in_flight == 3
    assert duration >= 2 * (0.2 + 5 * 0.03)


def test_warmups_are_untimed_and_use_their_own_prompts(fake_server):
    requests = [BenchRequest("dataset prompt", output_len=3)]
    results, _ = _run(fake_server.base_url, requests, num_warmups=2)
    assert len(results) == 1
    bodies = fake_server.state.payloads
    assert len(bodies) == 3 and [b["max_tokens"] for b in bodies] == [8, 8, 3]
    assert all(b["prompt"] != "dataset prompt" for b in bodies[:2])


def test_request_body(fake_server):
    _run(fake_server.base_url, [BenchRequest("hello there", output_len=3)])
    body = fake_server.state.payloads[-1]
    assert body["model"] == MODEL and body["prompt"] == "hello there"
    assert body["max_tokens"] == 3 and body["temperature"] == 0.0
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True


def test_usage_counts_tokens_even_when_chunks_hold_several(fake_server):
    fake_server.state.tokens_per_chunk = 4
    results, _ = _run(fake_server.base_url, [BenchRequest("x y", output_len=10, prompt_len=99)])
    assert results[0].output_tokens == 10
    assert len(results[0].itl) == 2  # three chunks: 4 + 4 + 2 tokens
    assert results[0].prompt_len == 2  # the server's usage wins over the dataset's figure


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT_COMPLETIONS])
def test_a_token_without_text_still_arrives(fake_server, endpoint):
    fake_server.state.empty_first_text, fake_server.state.itl_s = True, 0.1
    results, _ = _run(fake_server.base_url, [BenchRequest("x", output_len=3)], endpoint=endpoint)
    assert results[0].success and results[0].output_tokens == 3
    assert results[0].ttft < 0.1  # the first chunk, not the first visible text
    assert len(results[0].itl) == 2


def test_without_usage_chunks_are_counted(fake_server):
    fake_server.state.send_usage = False
    results, _ = _run(fake_server.base_url, [BenchRequest("x", output_len=7, prompt_len=3)])
    assert results[0].success and results[0].output_tokens == 7
    assert results[0].prompt_len == 3


def test_chat_endpoint_role_chunk_is_not_the_first_token(fake_server):
    fake_server.state.ttft_s = 0.15
    results, duration = _run(
        fake_server.base_url, [BenchRequest("hi", output_len=4)], endpoint=CHAT_COMPLETIONS
    )
    assert results[0].success and results[0].output_tokens == 4
    assert results[0].ttft >= 0.15
    assert fake_server.state.payloads[-1]["messages"] == [{"role": "user", "content": "hi"}]


def test_failures_are_counted_not_raised(fake_server):
    requests = [BenchRequest("ok", 2), BenchRequest("FAIL me", 2), BenchRequest("ok", 2)]
    results, duration = _run(fake_server.base_url, requests)
    s = summarize(results, duration)
    assert (s["completed"], s["failed"]) == (2, 1)
    assert "HTTP 500" in s["errors"][0]


def test_unreachable_server_fails_every_request():
    from pagedllm.entrypoints.bench.server_process import free_port

    results, _ = _run(f"http://127.0.0.1:{free_port()}", [BenchRequest("x", 2)] * 2)
    assert not any(r.success for r in results)
    assert "ConnectError" in results[0].error


def test_poisson_rate_spreads_the_requests(fake_server):
    requests = random_text_requests(5, 3, 2, seed=0)
    _, duration = _run(fake_server.base_url, requests, request_rate=20.0, seed=0)
    from pagedllm.entrypoints.bench.arrivals import arrival_offsets

    assert duration >= arrival_offsets(5, 20.0, seed=0)[-1]


def test_cli_asks_the_model_and_writes_json(fake_server, tmp_path, capsys):
    fake_server.state.ttft_s, fake_server.state.itl_s = 0.05, 0.01
    out = tmp_path / "serve.json"
    rc = main(
        [
            "serve",
            "--base-url",
            fake_server.base_url,
            "--num-prompts",
            "8",
            "--input-len",
            "4",
            "--output-len",
            "5",
            "--max-concurrency",
            "4",
            "--goodput",
            "ttft:5000",
            "tpot:1",
            "--output-json",
            str(out),
            "--save-detailed",
            "--disable-tqdm",
        ]
    )
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["model_id"] == MODEL  # from GET /v1/models
    assert record["completed"] == 8 and record["failed"] == 0
    assert record["total_output_tokens"] == 40
    assert record["max_concurrency"] == 4 and record["request_rate"] == "inf"
    assert record["num_good_requests"] == 0  # nobody meets a 1 ms TPOT
    assert record["request_goodput"] == 0.0
    assert len(record["requests"]) == 8 and len(record["requests"][0]["itl_s"]) == 4
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_cli_api_key_and_no_ignore_eos(fake_server):
    rc = main(
        [
            "serve",
            "--base-url",
            fake_server.base_url,
            "--model",
            "named",
            "--num-prompts",
            "2",
            "--input-len",
            "2",
            "--output-len",
            "2",
            "--disable-tqdm",
            "--no-ignore-eos",
            "--api-key",
            "sk-test",
        ]
    )
    assert rc == 0
    assert fake_server.state.auth_headers == ["Bearer sk-test"] * 2
    assert "ignore_eos" not in fake_server.state.payloads[-1]
    assert fake_server.state.payloads[-1]["model"] == "named"


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT_COMPLETIONS])
def test_cli_all_failed_returns_1(fake_server, tmp_path, endpoint):
    path = tmp_path / "fail.jsonl"
    path.write_text(json.dumps({"prompt": "FAIL", "output_len": 2}) + "\n")
    rc = main(
        [
            "serve",
            "--base-url",
            fake_server.base_url,
            "--dataset",
            str(path),
            "--num-prompts",
            "1",
            "--endpoint",
            endpoint,
            "--disable-tqdm",
        ]
    )
    assert rc == 1
