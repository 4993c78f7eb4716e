"""Multi-LoRA over HTTP: --lora-modules serve adapters under their own model names (greedy
output == LLM.generate with the same LoRARequest), /v1/models lists them with the base as
parent, runtime load/unload behind --allow-runtime-lora-updating, and clear 400s."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from pagedllm import LLM, LoRARequest, SamplingParams
from pagedllm.entrypoints.openai.cli_args import config_from_namespace, make_arg_parser
from tests.entrypoints.openai.utils import run_server, wait_idle
from tests.utils import load_hf_model, make_lora_adapter

PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    base = load_hf_model(tiny_llama_dir)
    root = tmp_path_factory.mktemp("server_loras")
    paths = {}
    for i, name in enumerate(["a", "b", "c"], start=1):
        make_lora_adapter(base, root / name, seed=20 + i)
        paths[name] = str(root / name)
    make_lora_adapter(base, root / "big", seed=30, rank=32)
    paths["big"] = str(root / "big")
    return paths


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapters):
    args = [
        tiny_llama_dir,
        "--dtype",
        "float32",
        "--served-model-name",
        "base",
        "--enable-lora",
        "--lora-modules",
        f"a={adapters['a']}",
        json.dumps({"name": "b", "path": adapters["b"]}),
        "--allow-runtime-lora-updating",
        "--kv-cache-memory",
        str(16 * 2**20),
    ]
    with run_server(args) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def _greedy(client, model: str) -> list[str]:
    resp = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True}
    )
    assert resp.model == model
    return resp.choices[0].text


def test_models_list_adapters(client, adapters):
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == ["base", "a", "b"]
    assert cards["a"].parent == "base" and cards["a"].root == adapters["a"]
    assert client.models.retrieve("b").parent == "base"


def test_each_model_name_runs_its_adapter(client, tiny_llama_dir, adapters):
    llm = LLM(tiny_llama_dir, dtype="float32", enable_lora=True, num_kv_blocks=128)
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    texts = {}
    for i, model in enumerate(["base", "a", "b"]):
        lora = None if model == "base" else LoRARequest(model, i, adapters[model])
        want = llm.generate(PROMPT, params, use_tqdm=False, lora_request=lora)[0]
        texts[model] = _greedy(client, model)
        assert texts[model] == tok.decode(want.outputs[0].token_ids)
    assert len(set(texts.values())) == 3
    chat = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert chat.model == "a"


def test_unknown_model_and_disabled_flags(server, client):
    with pytest.raises(openai.BadRequestError, match="serves `base`, `a`, `b`"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    ns = make_arg_parser().parse_args(["x", "--lora-modules", "a=/tmp"])
    with pytest.raises(ValueError, match="need --enable-lora"):
        config_from_namespace(ns)
    ns = make_arg_parser().parse_args(["x", "--enable-lora", "--lora-modules", "a"])
    with pytest.raises(ValueError, match="expected name=path"):
        config_from_namespace(ns)


def test_runtime_load_and_unload(server, client, adapters):
    url = server.url + "/v1"
    bad = httpx.post(url + "/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"
    big = httpx.post(
        url + "/load_lora_adapter", json={"lora_name": "x", "lora_path": adapters["big"]}
    )
    assert big.status_code == 400 and "max-lora-rank 16" in big.json()["error"]["message"]
    taken = httpx.post(
        url + "/load_lora_adapter", json={"lora_name": "a", "lora_path": adapters["c"]}
    )
    assert taken.status_code == 400 and taken.json()["error"]["param"] == "lora_name"
    ok = httpx.post(url + "/load_lora_adapter", json={"lora_name": "c", "lora_path": adapters["c"]})
    assert ok.status_code == 200, ok.text
    text_c = _greedy(client, "c")
    assert text_c not in (_greedy(client, "a"), _greedy(client, "base"))
    gone = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "c"})
    assert gone.status_code == 200, gone.text
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.completions.create(model="c", prompt="hi", max_tokens=2)
    again = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "c"})
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    # loaded again under the same name: the same output (and none of the old KV: a new id)
    assert (
        httpx.post(
            url + "/load_lora_adapter", json={"lora_name": "c", "lora_path": adapters["c"]}
        ).status_code
        == 200
    )
    assert _greedy(client, "c") == text_c
    wait_idle(server.url)


def test_runtime_updating_off_by_default(tiny_llama_dir, adapters):
    with run_server([tiny_llama_dir, "--enable-lora", "--kv-cache-memory", str(8 * 2**20)]) as h:
        resp = httpx.post(
            h.url + "/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": adapters["c"]}
        )
        assert resp.status_code == 404
        assert "--allow-runtime-lora-updating" in resp.json()["error"]["message"]
