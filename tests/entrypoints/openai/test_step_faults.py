"""A fault inside one engine step (injected through the executor) fails only the requests that
step ran, with a 500 error event (code step_failed); a request still waiting keeps its place
and completes, new requests are served, /health stays 200 and every KV block is free after."""

from __future__ import annotations

import json
import threading
import time

import httpx

from pagedllm.engine.llm_engine import LLMEngine
from tests.entrypoints.openai.utils import run_server, wait_idle, wait_until


def test_a_failed_step_fails_only_its_requests(tiny_llama_dir):
    state: dict = {"armed": False, "engine": None}

    def factory(args):
        engine = LLMEngine(args)
        execute = engine.executor.execute_model

        def faulty(scheduler_output):
            time.sleep(0.01)  # a step slow enough for the test to act between steps
            if state["armed"] and scheduler_output.num_scheduled_tokens:
                state["armed"] = False
                raise RuntimeError("injected fault")
            return execute(scheduler_output)

        engine.executor.execute_model = faulty
        state["engine"] = engine
        return engine

    args = [tiny_llama_dir, "--max-num-seqs", "1", "--kv-cache-memory", str(8 * 2**20)]
    with run_server(args, engine_factory=factory) as handle:
        url = handle.url
        body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
        events: list[dict] = []
        waiting_result: dict = {}

        def waiting_request() -> None:  # queued behind the stream (one seat)
            resp = httpx.post(
                url + "/v1/completions",
                json={"prompt": "world", "max_tokens": 8, "ignore_eos": True},
                timeout=60,
            )
            waiting_result["status"] = resp.status_code

        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    if len(events) == 3:
                        break
            waiter = threading.Thread(target=waiting_request)
            waiter.start()
            wait_until(lambda: state["engine"].scheduler.waiting, 10, "the second request to wait")
            state["armed"] = True
            for line in lines:
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
        assert "error" in events[-1], events[-1]
        assert events[-1]["error"]["code"] == "step_failed"
        assert "injected fault" in events[-1]["error"]["message"]
        waiter.join(60)
        assert waiting_result["status"] == 200  # it was not in the failed step
        assert httpx.get(url + "/health").status_code == 200
        after = httpx.post(url + "/v1/completions", json={"prompt": "again", "max_tokens": 4})
        assert after.status_code == 200, after.text
        wait_idle(url)
        kv = state["engine"].kv_cache_manager
        assert not kv.req_to_blocks and kv.num_free_blocks == kv.num_blocks


def test_live_fails_while_a_step_is_stuck(tiny_llama_dir):
    """/live: 500 engine_stalled while one step runs past --stall-timeout, 200 before and
    after; an idle engine (no step running) is alive however long it waits."""
    hang = threading.Event()

    def factory(args):
        engine = LLMEngine(args)
        execute = engine.executor.execute_model

        def stuck(scheduler_output):
            if hang.is_set() and scheduler_output.num_scheduled_tokens:
                hang.clear()
                time.sleep(3.0)
            return execute(scheduler_output)

        engine.executor.execute_model = stuck
        return engine

    args = [tiny_llama_dir, "--kv-cache-memory", str(8 * 2**20), "--stall-timeout", "1"]
    with run_server(args, engine_factory=factory) as handle:
        url = handle.url
        time.sleep(1.5)  # idle longer than the stall timeout
        assert httpx.get(url + "/live").status_code == 200
        hang.set()
        result: dict = {}

        def request() -> None:
            body = {"prompt": "hi", "max_tokens": 4}
            result["resp"] = httpx.post(url + "/v1/completions", json=body, timeout=30)

        thread = threading.Thread(target=request)
        thread.start()
        wait_until(
            lambda: httpx.get(url + "/live").status_code == 500, 10, "/live to report the stall"
        )
        error = httpx.get(url + "/live").json()["error"]
        assert error["code"] == "engine_stalled" and "--stall-timeout 1" in error["message"]
        thread.join(30)
        assert result["resp"].status_code == 200  # a slow step is not a failed one
        assert httpx.get(url + "/live").status_code == 200
        assert httpx.get(url + "/ready").status_code == 200
