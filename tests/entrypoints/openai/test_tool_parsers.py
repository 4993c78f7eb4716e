"""Tool-call parsers: each format's calls and content, malformed text kept as content, and the
streaming property the server relies on: parsing every prefix of an answer only ever extends
the previous result, so the deltas join to the non-streamed answer."""

from __future__ import annotations

import json

import pytest

from pagedllm.entrypoints.openai.tool_calls import ToolCallStream
from pagedllm.entrypoints.openai.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    NamedToolParser,
    XlamToolParser,
    get_tool_parser,
)

WEATHER = '{"city": "Paris", "unit": "celsius", "note": "a \\"quoted\\" }] {[ text"}'
TIME = '{"timezone": "Asia/Tokyo"}'

CASES = [
    (
        HermesToolParser(),
        f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n'
        f'</tool_call>\n<tool_call>{{"arguments": {TIME}, "name": "get_time"}}</tool_call>',
        "Let me check.\n",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        XlamToolParser(),
        f'<tool_call>[{{"name": "get_weather", "arguments": {WEATHER}}}, '
        f'{{"name": "get_time", "arguments": {TIME}}}]</tool_call>',
        "",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        XlamToolParser(),
        f'  [{{"name": "get_time", "arguments": {TIME}}}]',
        "",
        [("get_time", TIME)],
    ),
    (
        XlamToolParser(),
        'Sure. <tool_call>{"name": "now"}</tool_call>',
        "Sure. ",
        [("now", "{}")],
    ),
    (
        Llama3JsonToolParser(),
        f'<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER}}}; '
        f'{{"name": "get_time", "parameters": {TIME}}}',
        "",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (NamedToolParser("get_time"), TIME, "", [("get_time", TIME)]),
]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_whole_answers_parse_into_content_and_calls(parser, text, content, calls):
    parsed = parser.parse_final(text)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.calls] == calls
    for _, arguments in calls:
        assert isinstance(json.loads(arguments), dict)


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_streamed_deltas_join_to_the_whole_answer(parser, text, content, calls):
    stream = ToolCallStream(parser)
    streamed_content, names, arguments = "", {}, {}
    for end in range(1, len(text) + 1):
        new_content, deltas = stream.feed(text[:end], finished=end == len(text))
        streamed_content += new_content
        for d in deltas:
            if d.id is not None:  # a call's first delta: id, type and name, arguments ""
                assert d.index == len(names) and d.type == "function"
                assert d.function.name and d.function.arguments == ""
                names[d.index] = d.function.name
            else:
                assert d.function.name is None
                arguments[d.index] = arguments.get(d.index, "") + d.function.arguments
    assert streamed_content == content
    assert [(names[i], arguments[i]) for i in sorted(names)] == calls


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (HermesToolParser(), "<tool_call>not json</tool_call>"),
        (HermesToolParser(), '<tool_call>{"name": "f", "arguments": {"a": 1}'),  # cut
        (XlamToolParser(), "[1, 2, 3]"),
        (XlamToolParser(), '[{"name": "f", "arguments": "not an object"}]'),
        (XlamToolParser(), '[{"arguments": {}}]'),  # no name
        (Llama3JsonToolParser(), '{"name": "f", "parameters": {"a": 1}} trailing words'),
    ],
)
def test_malformed_calls_stay_content(parser, text):
    parsed = parser.parse_final(text)
    assert parsed.calls == [] and parsed.content == text


def test_text_that_may_start_a_call_is_held_back_until_it_does_not():
    parser = HermesToolParser()
    stream = ToolCallStream(parser)
    assert stream.feed("Hello <tool", finished=False) == ("Hello ", [])
    assert stream.feed("Hello <tools are fun", finished=False)[0] == "<tools are fun"
    assert stream.feed("Hello <tools are fun <", finished=True)[0] == " <"
    assert XlamToolParser().parse("plain text").content == "plain text"


def test_auto_picks_the_template_format():
    assert get_tool_parser("auto", "...<tool_call>...{{ tools }}").name == "hermes"
    assert get_tool_parser("auto", "<|python_tag|> {{ tools }}").name == "llama3_json"
    assert get_tool_parser("auto", "{{ tools }}", own_template=True).name == "xlam"
    assert get_tool_parser("hermes", None).name == "hermes"
    with pytest.raises(ValueError, match="tool-call-parser"):
        get_tool_parser("mistral", None)
