"""Structured outputs through the OpenAI API with the official client, on the default model
(SmolLM2, bf16 where the CPU has it): response_format json_schema and json_object, vLLM's
structured_outputs and guided_* fields on both endpoints, streaming, and 400s naming the field
for bad grammars, after which the server keeps serving."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tests.entrypoints.openai.utils import run_server, wait_idle

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["a", "b", "c"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["name", "count", "kind", "tags"],
}
PROMPT = (
    'A thing as a JSON object: {"name": "Widget", "count": 3, "kind": "a", "tags": ["x"]}\n'
    "And another one:\n"
)
MESSAGES = [{"role": "user", "content": "Describe a thing as JSON: name, count, kind, tags."}]


@pytest.fixture(scope="module")
def server(default_gguf):
    args = ["--max-model-len", "1024", "--kv-cache-memory", str(64 * 2**20)]
    with run_server(args) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}


def test_response_format_json_schema_validates_for_every_seed(client, server):
    for seed in range(8):
        resp = client.chat.completions.create(
            model=None,
            messages=MESSAGES,
            max_tokens=150,
            seed=seed,
            temperature=1.0,
            response_format=json_schema_format(SCHEMA),
        )
        choice = resp.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    wait_idle(server.url)


def test_json_object_and_streaming_deltas_join_to_the_whole_answer(client, server):
    kwargs = dict(
        model=None,
        messages=MESSAGES,
        max_tokens=60,
        seed=3,
        temperature=1.0,
        response_format={"type": "json_object"},
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = client.chat.completions.create(stream=True, **kwargs)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.message.content
    assert whole.message.content.lstrip().startswith("{")
    if whole.finish_reason == "stop":
        assert isinstance(json.loads(whole.message.content), dict)


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"guided_choice": ["alpha", "beta", "gamma"]}, lambda t: t in ("alpha", "beta", "gamma")),
        ({"guided_regex": r"[a-f]{4}-\d{2}"}, lambda t: re.fullmatch(r"[a-f]{4}-\d{2}", t)),
        ({"structured_outputs": {"regex": r"(yes|no)!"}}, lambda t: t in ("yes!", "no!")),
        (
            {"structured_outputs": {"grammar": 'root ::= "x" ("+" "x")*', "json": None}},
            lambda t: re.fullmatch(r"x(\+x)*", t),
        ),
        ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ],
    ids=["guided_choice", "guided_regex", "structured_regex", "structured_grammar", "guided_json"],
)
def test_vllm_fields_on_both_endpoints(client, extra, check):
    for seed in range(4):
        chat = client.chat.completions.create(
            model=None, messages=MESSAGES, max_tokens=150, seed=seed, extra_body=extra
        ).choices[0]
        done = client.completions.create(
            model=None, prompt=PROMPT, max_tokens=150, seed=seed, extra_body=extra
        ).choices[0]
        answers = [(chat.message.content, chat.finish_reason), (done.text, done.finish_reason)]
        for text, reason in answers:
            if reason == "stop":
                assert check(text), text
            else:  # only the unbounded grammar may run into max_tokens
                assert "grammar" in extra.get("structured_outputs", {}), text


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"response_format": json_schema_format({"type": 5})}, "response_format", "invalid JSON"),
        (
            {"response_format": json_schema_format({"type": "array", "uniqueItems": True})},
            "response_format",
            "uniqueItems",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "schema"),
        ({"guided_regex": "(a"}, "guided_regex", "parenthesis"),
        ({"structured_outputs": {"grammar": "root ::="}}, "structured_outputs", "EBNF"),
        ({"structured_outputs": {"jsn": {}}}, "structured_outputs", "unknown fields"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        (
            {"guided_regex": "a", "response_format": {"type": "json_object"}},
            "guided_regex",
            "at most one",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", None),
    ],
)
def test_bad_grammars_are_400_naming_the_field(client, server, body, param, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=None, messages=MESSAGES, max_tokens=8, extra_body=body)
    error = info.value.body
    assert error["param"] == param, error
    if message is not None:
        assert message in error["message"], error["message"]
    # The server keeps serving.
    ok = client.chat.completions.create(model=None, messages=MESSAGES, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")
    wait_idle(server.url)
