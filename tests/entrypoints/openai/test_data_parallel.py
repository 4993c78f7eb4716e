"""``pagedllm serve --data-parallel-size 2`` (a real front end and two replica processes):
64 concurrent requests spread over both replicas (their own metrics say so) with every answer
the single engine's greedy one, and a shared ~200-token system prompt routed to the replica
that cached it (its prefix-cache hits count the tokens)."""

from __future__ import annotations

import asyncio
import os
import re

import httpx
import openai

from pagedllm import LLM, SamplingParams
from tests.entrypoints.openai.utils import (
    parse_metrics,
    run_server_process,
    tokenize,
    wait_healthy,
    wait_until,
)
from tests.utils import TINY_CORPUS

NUM_REQUESTS = 64
MAX_TOKENS = 12


def _by_replica(url: str, name: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for (metric, labels), value in parse_metrics(text).items():
        if metric == name:
            replica = dict(labels)["replica"]
            out[replica] = out.get(replica, 0.0) + value
    return out


def test_two_replicas_share_the_load_and_keep_prefixes(tiny_llama_dir):
    prompts = [f"{i} the quick brown fox {i % 7} jumps" for i in range(NUM_REQUESTS)]
    system = TINY_CORPUS[:700]
    questions = [f"question {i}: hello world?" for i in range(5)]
    chats = [
        [{"role": "system", "content": system}, {"role": "user", "content": q}] for q in questions
    ]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(tiny_llama_dir, dtype="float32", kv_cache_memory=2**24) as llm:
        want = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
        want_chat = [o.outputs[0].text for o in llm.chat(chats, params, use_tqdm=False)]
    args = [
        tiny_llama_dir,
        "--dtype",
        "float32",
        "--served-model-name",
        "tiny",
        "--kv-cache-memory",
        str(2**24),
        "--data-parallel-size",
        "2",
    ]
    with run_server_process(args) as (proc, url, lines):
        wait_healthy(url, alive=lambda: proc.poll() is None)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        async def one(prompt: str) -> str:
            out = await client.completions.create(
                model="tiny",
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
            return out.choices[0].text

        async def all_at_once() -> list[str]:
            return await asyncio.gather(*(one(p) for p in prompts))

        assert asyncio.run(all_at_once()) == want
        done = _by_replica(url, "pagedllm:request_success_total")
        assert set(done) == {"0", "1"} and all(v > 0 for v in done.values()), done
        assert sum(done.values()) == NUM_REQUESTS
        routed = _by_replica(url, "pagedllm:dp_requests_routed_total")
        assert routed == done

        # the shared system prompt: the first chat lands somewhere, the rest follow it there
        sync = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        system_tokens = len(tokenize(url, messages=chats[0][:1]))
        assert system_tokens >= 200
        hits_before = _by_replica(url, "pagedllm:prefix_cache_hits_total")
        answers = []
        for chat in chats:
            out = sync.chat.completions.create(
                model="tiny",
                messages=chat,
                max_tokens=MAX_TOKENS,
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
            answers.append(out.choices[0].message.content)
        assert answers == want_chat
        prefix_routed = _by_replica(url, "pagedllm:dp_requests_prefix_routed_total")
        owner = max(prefix_routed, key=prefix_routed.get)
        assert prefix_routed[owner] == len(chats) - 1
        hits = _by_replica(url, "pagedllm:prefix_cache_hits_total")
        gained = {r: hits[r] - hits_before.get(r, 0.0) for r in hits}
        # each later chat reused the system prompt's whole blocks on the owner, none elsewhere
        assert gained[owner] >= (len(chats) - 1) * (system_tokens // 16 * 16) * 0.9
        assert all(v == 0 for r, v in gained.items() if r != owner), gained
        found = [re.search(r"replicas \(pids \[(\d+), (\d+)\]", line) for line in lines]
        pids = [int(p) for p in next(m for m in found if m).groups()]
    # The front end was killed (SIGKILL) on leaving the block: its replicas die with it.
    wait_until(lambda: not any(_alive(p) for p in pids), 15, "the replicas to exit")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (dead, not yet reaped) counts as gone
        return f.read().split(") ", 1)[1][0] != "Z"


def test_replicas_serve_embeddings(minilm_dir):
    """A pooling model behind the front end: /v1/embeddings and /score reach a replica, which
    answers as one engine does."""
    with LLM(minilm_dir, dtype="float32") as llm:
        want = [o.outputs.embedding for o in llm.embed(["a cat", "a dog"], use_tqdm=False)]
    args = [
        minilm_dir,
        "--dtype",
        "float32",
        "--served-model-name",
        "m",
        "--data-parallel-size",
        "2",
    ]
    with run_server_process(args) as (proc, url, _):
        wait_healthy(url, alive=lambda: proc.poll() is None)
        resp = httpx.post(url + "/v1/embeddings", json={"input": ["a cat", "a dog"]}, timeout=60)
        assert resp.status_code == 200, resp.text
        got = [d["embedding"] for d in resp.json()["data"]]
        assert max(abs(x - y) for g, w in zip(got, want) for x, y in zip(g, w)) < 1e-5
        score = httpx.post(url + "/score", json={"text_1": "a cat", "text_2": "a dog"}, timeout=60)
        assert score.status_code == 200, score.text


def test_lora_adapters_load_on_every_replica(tiny_llama_dir, tmp_path):
    """/v1/load_lora_adapter through the front end loads the adapter on both replicas: requests
    for it then succeed on whichever replica they land; unloading removes it everywhere."""
    from tests.utils import load_hf_model, make_lora_adapter

    make_lora_adapter(load_hf_model(tiny_llama_dir), tmp_path / "ad", seed=5)
    args = [
        tiny_llama_dir,
        "--kv-cache-memory",
        str(2**24),
        "--data-parallel-size",
        "2",
        "--enable-lora",
        "--allow-runtime-lora-updating",
    ]
    with run_server_process(args) as (proc, url, _):
        wait_healthy(url, alive=lambda: proc.poll() is None)
        body = {"lora_name": "ad", "lora_path": str(tmp_path / "ad")}
        assert httpx.post(url + "/v1/load_lora_adapter", json=body, timeout=60).status_code == 200
        again = httpx.post(url + "/v1/load_lora_adapter", json=body, timeout=60)
        assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
        request = {"model": "ad", "prompt": "hello", "max_tokens": 8, "ignore_eos": True}

        async def concurrently(n: int) -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                posts = [
                    client.post(url + "/v1/completions", json={**request, "prompt": f"{i} hi"})
                    for i in range(n)
                ]
                return await asyncio.gather(*posts)

        # at once, so least-loaded routing gives both replicas some
        assert all(r.status_code == 200 for r in asyncio.run(concurrently(16)))
        done = _by_replica(url, "pagedllm:request_success_total")
        assert set(done) == {"0", "1"}, done
        unload = {"lora_name": "ad"}
        assert (
            httpx.post(url + "/v1/unload_lora_adapter", json=unload, timeout=60).status_code == 200
        )
        assert all(r.status_code == 400 for r in asyncio.run(concurrently(4)))
