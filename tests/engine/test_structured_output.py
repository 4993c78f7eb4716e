"""Structured outputs on the real SmolLM2 model (fp32, drafts on by default): JSON schemas,
choices, regexes and EBNF grammars hold for greedy and sampled requests; unconstrained
requests in the same batch are untouched; drafts and preemption keep outputs exact; bad
grammars are ValueErrors that leave the engine serving; no KV block leaks."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import StructuredOutputsParams
from tests.utils import CHAT_PROMPTS, assert_no_leak

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
}
PERSON = [{"role": "user", "content": "Describe a person as JSON: name, age, color, tags."}]
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
PHONE = [{"role": "user", "content": "Give me a phone number."}]
SEEDS = range(20)


def chat(llm: LLM, messages, params: SamplingParams | list[SamplingParams]):
    n = len(params) if isinstance(params, list) else 1
    outs = llm.chat([messages] * n, params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def sampled(spec: StructuredOutputsParams, max_tokens: int = 200) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=1.0, seed=s, max_tokens=max_tokens, structured_outputs=spec)
        for s in SEEDS
    ]


def greedy(spec: StructuredOutputsParams | None, max_tokens: int = 200) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=spec)


@pytest.mark.parametrize("whitespace", [True, False], ids=["any_whitespace", "compact"])
def test_json_schema_greedy_and_sampled_validate(smol_llm, whitespace):
    spec = StructuredOutputsParams(json=PERSON_SCHEMA, disable_any_whitespace=not whitespace)
    outs = chat(smol_llm, PERSON, [greedy(spec), *sampled(spec)])
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), PERSON_SCHEMA)
    assert len({o.text for o in outs}) > 5  # the seeds really sampled different objects
    assert_no_leak(smol_llm.engine)


def test_json_object_is_an_object(smol_llm):
    spec = StructuredOutputsParams(json_object=True)
    for o in chat(smol_llm, PERSON, [greedy(spec, 120), *sampled(spec, 120)[:6]]):
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
        else:  # cut by max_tokens: still a valid prefix of an object
            assert o.text.lstrip().startswith("{")
    assert_no_leak(smol_llm.engine)


def test_choice_outputs_are_always_listed(smol_llm):
    choices = ["Paris", "London", "Berlin", 'the "big" apple']
    spec = StructuredOutputsParams(choice=choices)
    outs = chat(smol_llm, CAPITAL, [greedy(spec), *sampled(spec)])
    assert all(o.text in choices and o.finish_reason == "stop" for o in outs)
    assert len({o.text for o in outs}) > 1
    assert_no_leak(smol_llm.engine)


def test_regex_matches_fully(smol_llm):
    spec = StructuredOutputsParams(regex=r"\d{3}-\d{4}")
    for o in chat(smol_llm, PHONE, [greedy(spec), *sampled(spec)]):
        assert re.fullmatch(r"\d{3}-\d{4}", o.text), o.text
        assert o.finish_reason == "stop"


def test_ebnf_grammar_is_respected(smol_llm):
    grammar = 'root ::= "(" num ("," num)* ")"\nnum ::= [1-9] [0-9]?'
    spec = StructuredOutputsParams(grammar=grammar)
    prompt = [{"role": "user", "content": "List some small numbers."}]
    for o in chat(smol_llm, prompt, [greedy(spec, 60), *sampled(spec, 60)]):
        if o.finish_reason == "stop":
            assert re.fullmatch(r"\((?:[1-9][0-9]?)(?:,[1-9][0-9]?)*\)", o.text), o.text
        else:
            assert re.fullmatch(r"\((?:[1-9][0-9]?,)*[1-9]?[0-9]?", o.text), o.text


def test_unconstrained_requests_are_untouched_in_a_mixed_batch(smol_llm):
    plain = [
        smol_llm.chat([{"role": "user", "content": p}], greedy(None, 48), use_tqdm=False)[0]
        for p in CHAT_PROMPTS
    ]
    spec = StructuredOutputsParams(json=PERSON_SCHEMA)
    prompts = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS] + [PERSON] * 6
    params = [greedy(None, 48)] * len(CHAT_PROMPTS) + [
        SamplingParams(temperature=0.8, seed=s, max_tokens=120, structured_outputs=spec)
        for s in range(6)
    ]
    mixed = smol_llm.chat(prompts, params, use_tqdm=False)
    for alone, together in zip(plain, mixed):
        assert together.outputs[0].token_ids == alone.outputs[0].token_ids
    for out in mixed[len(CHAT_PROMPTS) :]:
        if out.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(out.outputs[0].text), PERSON_SCHEMA)
    assert_no_leak(smol_llm.engine)


@pytest.fixture(scope="module")
def smol_no_drafts(default_gguf):
    llm = LLM(
        default_gguf,
        dtype="float32",
        kv_cache_memory=64 * 2**20,
        max_model_len=1024,
        speculative_config="none",
    )
    yield llm
    llm.shutdown()


def test_drafts_on_and_off_give_identical_constrained_outputs(smol_llm, smol_no_drafts):
    # An array without a bound: SmolLM2 repeats itself in it, which is where n-gram drafts
    # are proposed and must be cut to the grammar (and checked against its masks).
    loose = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
    }
    specs = [
        StructuredOutputsParams(json=loose),
        StructuredOutputsParams(json=PERSON_SCHEMA),
        StructuredOutputsParams(grammar='root ::= ("ab" | "abc" | " ")+'),
        StructuredOutputsParams(regex=r"(\d{3}-){10}"),
    ]
    prompts = [PERSON, PERSON, PHONE, PHONE]
    params = [greedy(s, 160) for s in specs]
    stats = smol_llm.engine.scheduler
    drafted, accepted = stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens
    on = smol_llm.chat(prompts, params, use_tqdm=False)
    assert stats.spec_num_accepted_tokens - accepted > 20  # drafts were really used...
    assert stats.spec_num_draft_tokens - drafted > stats.spec_num_accepted_tokens - accepted
    off = smol_no_drafts.chat(prompts, params, use_tqdm=False)
    for a, b in zip(on, off):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert_no_leak(smol_llm.engine)


def test_preemption_and_n_keep_each_sample_on_its_grammar(default_gguf, smol_no_drafts):
    spec = StructuredOutputsParams(json=PERSON_SCHEMA)
    topics = ["a pilot", "a cook", "a child", "a painter"]
    prompts = [[{"role": "user", "content": f"Describe {t} as JSON."}] for t in topics]
    greedy_params = greedy(spec, 160)
    n_params = SamplingParams(temperature=1.0, seed=7, n=4, max_tokens=160, structured_outputs=spec)
    # A cache of 18 blocks of 16 tokens cannot hold the 8 sequences at once: preemptions, and
    # recomputed requests must resume on their grammar (their matcher is theirs, not shared).
    with LLM(
        default_gguf, dtype="float32", num_kv_blocks=18, max_model_len=256, max_num_seqs=8
    ) as small:
        tight = small.chat(prompts, greedy_params, use_tqdm=False)
        preempted = small.engine.scheduler.num_preemptions_total
        samples = small.chat(prompts[:2], n_params, use_tqdm=False)
        assert small.engine.scheduler.num_preemptions_total > preempted > 0
        assert_no_leak(small.engine)
    # fp32 greedy output does not depend on the batch: preempted == run at ease.
    roomy = smol_no_drafts.chat(prompts, greedy_params, use_tqdm=False)
    for a, b in zip(tight, roomy):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for out in [*tight, *samples]:
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), PERSON_SCHEMA)
    assert len({c.text for out in samples for c in out.outputs}) == 8


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"json": {"type": 5}}, "invalid JSON schema"),
        ({"json": {"type": "object", "not": {"required": ["a"]}}}, "'not'"),
        ({"json": {"type": "string", "format": "iri"}}, "format 'iri'"),
        ({"json": '{"type": "object"'}, "not valid JSON"),
        ({"regex": "(a"}, "parenthesis"),
        ({"grammar": 'root ::= "a" |'}, "EBNF"),
        ({"grammar": 'start ::= "a"'}, "root"),
        ({"choice": []}, "non-empty list"),
        ({"regex": "a", "choice": ["a"]}, "exactly one"),
        ({"jsn": {}}, "unknown fields"),
    ],
)
def test_bad_grammars_raise_and_the_engine_keeps_serving(smol_llm, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        smol_llm.chat(CAPITAL, SamplingParams(max_tokens=4, structured_outputs=spec))
    out = chat(smol_llm, CAPITAL, greedy(None, 8))[0]
    assert "Paris" in out.text
    assert_no_leak(smol_llm.engine)
