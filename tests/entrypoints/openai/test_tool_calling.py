"""Tool calling through the OpenAI API with the official client on the default model
(SmolLM2-135M, whose own template has no tools: pagedllm's ChatML tool template renders them):
named and required tool_choice give calls whose arguments validate against the tool's schema
(a grammar enforces them), streamed deltas join to the non-streamed call, a whole round trip
(call -> tool result -> answer) works, tool_choice auto parses calls out of the text, and bad
tools are 400s naming the field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.entrypoints.openai.utils import run_server, wait_idle

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 40}},
    "required": ["timezone"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the current time in a time zone",
            "parameters": TIME,
        },
    },
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def server(default_gguf):
    # 128 MiB: 2,048 tokens of fp32 KV (--dtype auto is fp32 on a CPU without bf16 dot products)
    args = ["--max-model-len", "2048", "--kv-cache-memory", str(128 * 2**20)]
    with run_server(args) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def assert_valid_call(call, names=("get_weather", "get_time")) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def streamed_calls(chunks) -> tuple[str, list[tuple[str, str, str]], str | None]:
    """Join a stream's deltas: (content, [(id, name, arguments)], finish_reason)."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                if d.id is not None:
                    calls[d.index] = [d.id, d.function.name, d.function.arguments or ""]
                else:
                    assert d.function.name is None
                    calls[d.index][2] += d.function.arguments
            finish = choice.finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


def test_named_tool_choice_returns_a_valid_call_and_the_stream_joins_to_it(client):
    kwargs = dict(
        model=None,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0.0,
    )
    resp = client.chat.completions.create(**kwargs)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    # /tokenize renders the tools too: the same prompt the request paid for.
    counted = httpx.post(
        str(client.base_url).removesuffix("v1/") + "tokenize",
        json={"messages": ASK, "tools": TOOLS},
        timeout=30,
    ).json()["count"]
    assert counted == resp.usage.prompt_tokens > 150
    assert assert_valid_call(call)["city"]
    content, calls, finish = streamed_calls(client.chat.completions.create(stream=True, **kwargs))
    assert finish == "tool_calls" and content == ""
    [(_, name, arguments)] = calls
    assert (name, arguments) == (call.function.name, call.function.arguments)


@pytest.mark.parametrize("parallel", [None, False])
def test_required_tool_choice_returns_valid_calls_for_every_seed(client, parallel):
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    questions = ["What is the weather like in Paris today?", "What time is it in Tokyo?"]
    for seed, question in enumerate(questions * 3):
        choice = client.chat.completions.create(
            model=None,
            messages=[{"role": "user", "content": question}],
            tools=TOOLS,
            tool_choice="required",
            max_tokens=120,
            temperature=0.7,
            seed=seed,
            **extra,
        ).choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.tool_calls, choice.message
        if parallel is False:
            assert len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            assert_valid_call(call)


def test_round_trip_call_then_tool_result_then_answer(client):
    first = client.chat.completions.create(
        model=None,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=80,
        temperature=0.0,
    ).choices[0]
    [call] = first.message.tool_calls[:1]
    messages = [
        *ASK,
        first.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 22, "sky": "sunny"}'},
    ]
    final = client.chat.completions.create(
        model=None, messages=messages, tools=TOOLS, max_tokens=40, temperature=0.0
    ).choices[0]
    assert final.message.tool_calls in (None, [])
    assert final.finish_reason in ("stop", "length")
    assert final.message.content and "sunny" in final.message.content.lower()


def test_auto_parses_calls_out_of_the_answer(client):
    # SmolLM2-135M seldom calls a tool on its own; a grammar makes it answer in the format the
    # tool template asks for (xLAM's), which the auto parser must turn into tool_calls.
    grammar = (
        'root ::= "Checking. <tool_call>[{\\"name\\": \\"get_time\\", \\"arguments\\": '
        '{\\"timezone\\": \\"" [A-Za-z/]+ "\\"}}]</tool_call>"'
    )
    kwargs = dict(
        model=None,
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=TOOLS,
        max_tokens=60,
        temperature=0.0,
        extra_body={"structured_outputs": {"grammar": grammar}},
    )
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    [call] = choice.message.tool_calls
    assert call.function.name == "get_time" and assert_valid_call(call)["timezone"]
    content, calls, finish = streamed_calls(client.chat.completions.create(stream=True, **kwargs))
    assert (content.strip(), finish) == ("Checking.", "tool_calls")
    assert [(n, a) for _, n, a in calls] == [("get_time", call.function.arguments)]


def test_tool_choice_none_and_no_call_answers_are_plain_text(client):
    for tool_choice in ("none", "auto"):
        choice = client.chat.completions.create(
            model=None,
            messages=[{"role": "user", "content": "Say hello."}],
            tools=TOOLS,
            tool_choice=tool_choice,
            max_tokens=12,
            temperature=0.0,
        ).choices[0]
        assert choice.message.tool_calls in (None, [])
        assert choice.message.content and choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "get_stock"}}},
            "tool_choice.function.name",
            "not among the tools",
        ),
        (
            {"tools": [{"type": "function", "function": {"description": "no name"}}]},
            "tools.0.function.name",
            None,
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
            "tools.0.function.parameters",
            "not a valid JSON schema",
        ),
        (
            {"tools": [TOOLS[0], TOOLS[0]]},
            "tools.1.function.name",
            "two tools",
        ),
        (
            {"tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "cannot be combined",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"not": {"type": "object"}}},
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
            "'not'",
        ),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "1", "function": {"arguments": "{}"}}],
                    },
                ]
            },
            "messages.1.tool_calls.0.function",
            None,
        ),
    ],
)
def test_bad_tools_are_400_naming_the_field(client, server, body, param, message):
    request = {"model": None, "messages": ASK, "tools": TOOLS, "max_tokens": 8, **body}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**request)
    error = info.value.body
    assert error["param"] == param, error
    if message is not None:
        assert message in error["message"], error["message"]
    ok = client.chat.completions.create(model=None, messages=ASK, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")
    wait_idle(server.url)
