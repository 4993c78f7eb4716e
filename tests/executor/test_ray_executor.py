"""The ray backend: tensor-parallel ranks as Ray actors on a local Ray cluster the test starts
(on loopback), the same Worker code as mp: logits match transformers at TP 2, generation leaves
nothing behind on any rank, an OpenAI server over Ray actors answers the official client as one
rank does, and an address where no cluster answers fails within seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import openai
import pytest
import ray

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.executor.base import WorkerDiedError, free_port
from tests.utils import assert_no_leak, check_logits_parity


def _ray_tp2_engine(model_dir: str, **overrides) -> LLMEngine:
    args = dict(
        model=model_dir,
        dtype="float32",
        tensor_parallel_size=2,
        distributed_executor_backend="ray",
        speculative_config=None,
    )
    return LLMEngine(EngineArgs(**(args | overrides)))


def test_tp2_as_ray_actors_matches_transformers(ray_cluster, tiny_llama_dir):
    engine = _ray_tp2_engine(tiny_llama_dir, block_size=5, num_kv_blocks=4096 // 5)
    try:
        # rank 1 is an actor of this cluster, in its own process
        pids = engine.executor.collective_rpc("pid", all_ranks=True)
        assert pids[0] == os.getpid() and pids[1] != os.getpid()
        assert ray.available_resources().get("CPU", 0) == 1  # its bundle holds one of two
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        for i in range(5):
            engine.add_request(str(i), list(range(5, 12 + 9 * i)), params)
        while engine.has_unfinished_requests():
            engine.step()
        engine.step()
        assert_no_leak(engine)
        assert engine.executor.collective_rpc("num_request_states", all_ranks=True) == [0, 0]
        check_logits_parity(
            lambda out: engine.executor.collective_rpc("forward_logits", out, True)[0],
            tiny_llama_dir,
            block_size=5,
            max_batched=24,
        )
    finally:
        engine.shutdown()
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2  # the actor and its bundle are gone


def test_a_lost_actor_fails_the_engine_quickly(ray_cluster, tiny_llama_dir):
    engine = _ray_tp2_engine(tiny_llama_dir, num_kv_blocks=64)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        engine.add_request("0", [5, 6, 7], params)
        engine.step()
        ray.kill(engine.executor._actors[0])
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match="Ray tensor-parallel worker"):
            while time.monotonic() - t0 < 60:
                engine.step()
        assert time.monotonic() - t0 < 30
    finally:
        engine.shutdown()


def test_unreachable_ray_address_fails_within_seconds(tiny_llama_dir):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    code = (
        "from pagedllm import LLM\n"
        f"LLM({tiny_llama_dir!r}, tensor_parallel_size=2, "
        f"distributed_executor_backend='ray', ray_address={address!r})\n"
    )
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"--ray-address {address}: no Ray cluster answers there" in proc.stderr
    assert time.monotonic() - t0 < 60  # interpreter + imports; Ray alone would retry minutes


def test_openai_server_over_ray_actors_answers_like_one_rank(ray_cluster, tiny_llama_dir):
    from tests.entrypoints.openai.utils import run_server, wait_idle

    prompts = ["hello world", "The quick brown fox", "Paged attention keeps"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with LLM(tiny_llama_dir, dtype="float32", kv_cache_memory=2**24) as llm:
        want = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
        chat = [{"role": "user", "content": "hello world"}]
        want_chat = llm.chat(chat, params, use_tqdm=False)[0].outputs[0].text
    args = [tiny_llama_dir, "--dtype", "float32", "--tensor-parallel-size", "2"]
    args += ["--distributed-executor-backend", "ray", "--kv-cache-memory", str(2**24)]
    with run_server(args) as server:
        assert ray.available_resources().get("CPU", 0) == 1  # rank 1 is an actor of ours
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        for prompt, text in zip(prompts, want):
            got = client.completions.create(
                model=None,
                prompt=prompt,
                max_tokens=12,
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
            assert got.choices[0].text == text
        chunks = client.chat.completions.create(
            model=None,
            messages=chat,
            max_tokens=12,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat
        wait_idle(server.url)
