"""/v1/embeddings (with the official openai client), /pooling and /score on a pooling server
running all-MiniLM-L6-v2: the embeddings are LLM.embed's (and so sentence-transformers'), every
input form and encoding works, bad input gets a 400 naming its field, routes of the other
runner are refused, and nothing is left running or cached afterwards."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import openai
import pytest

from pagedllm.entrypoints.llm import LLM
from tests.entrypoints.openai.utils import get_metric, run_server, wait_idle

TEXTS = ["A cat sits on the mat.", "Stock markets fell sharply today.", "A kitten naps."]


@pytest.fixture(scope="module")
def server(minilm_dir):
    with run_server([minilm_dir, "--dtype", "float32", "--served-model-name", "minilm"]) as h:
        yield h


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(minilm_dir) -> np.ndarray:
    llm = LLM(minilm_dir, dtype="float32")
    return np.array([o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)])


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_embeddings_match_offline_in_every_form(client, server, reference, minilm_st):
    # the client's default asks for base64 and decodes it
    default = client.embeddings.create(model="minilm", input=TEXTS)
    floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    for resp in (default, floats):
        assert [d.index for d in resp.data] == [0, 1, 2]
        got = np.array([d.embedding for d in resp.data])
        np.testing.assert_allclose(got, reference, atol=1e-5)
    assert floats.model == "minilm"
    tok = minilm_st.tokenizer
    ids = [tok.encode(t) for t in TEXTS]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(map(len, ids))
    one = client.embeddings.create(model="minilm", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, reference[0], atol=1e-5)
    by_ids = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in by_ids.data], reference, atol=1e-5)
    one_ids = client.embeddings.create(model="minilm", input=ids[1], encoding_format="float")
    np.testing.assert_allclose(one_ids.data[0].embedding, reference[1], atol=1e-5)


def test_concurrent_clients_get_their_own_embeddings(server, reference):
    async def go():
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        calls = [aclient.embeddings.create(model="minilm", input=TEXTS[i % 3]) for i in range(24)]
        return await asyncio.gather(*calls)

    for i, resp in enumerate(asyncio.run(go())):
        np.testing.assert_allclose(resp.data[0].embedding, reference[i % 3], atol=1e-5)


@pytest.mark.parametrize(
    "body,param,fragment",
    [
        ({"input": " ".join(["word"] * 300)}, "input", "max_model_len=256"),
        ({"input": "hi", "dimensions": 64}, "dimensions", "not trained to be cut"),
        ({"input": "hi", "dimensions": 0}, "dimensions", "positive"),
        ({"input": []}, "input", "must not be empty"),
        ({"input": ["ok", ""]}, "input", "empty"),
        ({"input": [[1, 2, 99999]]}, "input", "out of range"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format", ""),
        ({"input": "hi", "truncate_prompt_tokens": 999}, "truncate_prompt_tokens", "max_model"),
        ({"input": "hi", "model": "other"}, "model", "does not exist"),
        ({"input": "hi", "temperature": 0.5}, "temperature", ""),
    ],
)
def test_bad_embedding_requests_get_400(server, body, param, fragment):
    resp = _post(server, "/v1/embeddings", body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param, error
    assert fragment in error["message"]


def test_truncate_prompt_tokens(server):
    body = {"input": " ".join(["word"] * 300), "truncate_prompt_tokens": -1}
    resp = _post(server, "/v1/embeddings", body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == 256


def test_generation_routes_are_refused(server, client):
    with pytest.raises(openai.BadRequestError, match="pooling"):
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="pooling"):
        client.completions.create(model="minilm", prompt="hi")
    assert [m.id for m in client.models.list().data] == ["minilm"]


def test_score_and_pooling(server, reference):
    resp = _post(server, "/score", {"text_1": TEXTS[0], "text_2": [TEXTS[2], TEXTS[1]]})
    assert resp.status_code == 200, resp.text
    scores = [d["score"] for d in resp.json()["data"]]
    np.testing.assert_allclose(scores, reference[[2, 1]] @ reference[0], atol=1e-5)
    assert scores[0] > scores[1]  # a kitten is nearer a cat than a stock market is
    pairs = _post(server, "/v1/score", {"text_1": TEXTS[:2], "text_2": TEXTS[1:]})
    want = [reference[0] @ reference[1], reference[1] @ reference[2]]
    np.testing.assert_allclose([d["score"] for d in pairs.json()["data"]], want, atol=1e-5)
    bad = _post(server, "/score", {"text_1": TEXTS[:2], "text_2": TEXTS})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text_2"
    pooled = _post(server, "/pooling", {"input": TEXTS[1]})
    assert pooled.json()["data"][0]["object"] == "pooling"
    np.testing.assert_allclose(pooled.json()["data"][0]["data"], reference[1], atol=1e-5)


def test_server_idle_and_counted_after_requests(server):
    _post(server, "/v1/embeddings", {"input": TEXTS})
    wait_idle(server.url)
    assert get_metric(server.url, "pagedllm:prompt_tokens_total") > 0
    assert get_metric(server.url, "pagedllm:num_requests_running") == 0
    assert get_metric(server.url, "pagedllm:num_requests_waiting") == 0


def test_embeddings_on_a_generative_server_get_400(tiny_llama_dir):
    with run_server([tiny_llama_dir, "--kv-cache-memory", str(16 * 2**20)]) as handle:
        resp = _post(handle, "/v1/embeddings", {"input": "hello"})
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "model_not_supported"
        assert "--runner pooling" in resp.json()["error"]["message"]
        score = _post(handle, "/score", {"text_1": "a", "text_2": "b"})
        assert score.status_code == 400
