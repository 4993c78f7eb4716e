"""bf16 is the default dtype on CPUs that multiply bf16 natively only because its answers stay
coherent: the real SmolLM2 model, in the default dtype, must answer factual chat questions as
its fp32 self does (the issue reports vLLM's bf16 answering "What is the capital of France?"
with French gibberish on this model)."""

from __future__ import annotations

import re

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineArgs
from pagedllm.cpu_info import has_native_bf16

# Questions this 135M model answers correctly in fp32 (greedy), with what a right answer says.
QUESTIONS = [
    ("What is the capital of France?", "paris"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("What color is the sky on a clear day?", "blue"),
    ("How many days are in a week?", "seven|7"),
    ("What is the chemical symbol for water?", "h2o|h₂o"),
    ("What is the capital of Japan?", "tokyo"),
    ("What language is spoken in Spain?", "spanish"),
]


def test_auto_dtype_is_bf16_exactly_on_cpus_with_native_bf16():
    expected = "bfloat16" if has_native_bf16() else "float32"
    assert EngineArgs(device="cpu").dtype == expected
    assert EngineArgs(device="cpu", dtype="auto").dtype == expected
    assert EngineArgs(device="cpu", dtype="float32").dtype == "float32"


@pytest.fixture(scope="module")
def bf16_llm(default_gguf):
    # The default dtype where bf16 is the default; bf16 explicitly elsewhere (same check).
    dtype = "auto" if has_native_bf16() else "bfloat16"
    llm = LLM(default_gguf, dtype=dtype, kv_cache_memory=64 * 2**20, max_model_len=1024)
    assert llm.engine.model_config.dtype == "bfloat16"
    return llm


def _check_answers(llm, smol_llm, label: str, max_differing_starts: int) -> None:
    conversations = [[{"role": "user", "content": q}] for q, _ in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=32)
    got = [o.outputs[0].text for o in llm.chat(conversations, params)]
    fp32 = [o.outputs[0].text for o in smol_llm.chat(conversations, params)]
    for (question, answer), text in zip(QUESTIONS, got):
        assert re.search(answer, text.lower()), f"{label} answered {question!r} with {text!r}"
    # Not just the right keyword: the answers are the fp32 model's, word for word, for most
    # questions (greedy decoding can part ways late on a near-tie).
    same_start = sum(b.split()[:6] == f.split()[:6] for b, f in zip(got, fp32))
    assert same_start >= len(QUESTIONS) - max_differing_starts, list(zip(got, fp32))


def test_bf16_chat_answers_stay_coherent(bf16_llm, smol_llm):
    _check_answers(bf16_llm, smol_llm, "bf16", max_differing_starts=1)


def test_int8_kv_cache_answers_stay_coherent(default_gguf, smol_llm):
    """--kv-cache-dtype int8 on the real model, in the default dtype: still the right answers,
    mostly word for word the fp32 model's."""
    llm = LLM(default_gguf, kv_cache_dtype="int8", kv_cache_memory=64 * 2**20, max_model_len=1024)
    _check_answers(llm, smol_llm, "int8 KV", max_differing_starts=2)


def test_int8_weights_answers_stay_coherent(default_gguf, smol_llm):
    """--quantization int8 on the real model: batch-1 style decoding (one conversation at a time,
    so every decode step runs the int8 weights) still gives the right answers. 48 tokens: the
    int8 weights narrow near-ties (" often" leads " a" by 0.23 nats after "The sky on a clear day
    is" in fp32, by 0.13 with int8 weights), and after the first questions' prompts are cached
    the sky answer takes the other branch and names the color at its 35th token."""
    llm = LLM(default_gguf, quantization="int8", kv_cache_memory=64 * 2**20, max_model_len=1024)
    params = SamplingParams(temperature=0.0, max_tokens=48)
    for question, answer in QUESTIONS:
        text = llm.chat([[{"role": "user", "content": question}]], params)[0].outputs[0].text
        assert re.search(answer, text.lower()), f"int8 weights answered {question!r} with {text!r}"


def test_bf16_greedy_output_does_not_depend_on_the_batch(bf16_llm):
    """Greedy text in bf16 must be the same alone and inside a busy batch of sampled requests
    (the hostile probe saw 5 of 10 differ): a lone row runs as two in oneDNN's GEMM, and greedy
    rows settle near-ties the same way whatever their neighbours (input_batch.padded_rows,
    Sampler._greedy)."""
    import random

    prompts = [
        f"Write a short story about a {w} who learns to"
        for w in ("cat", "robot", "farmer", "pilot", "river", "teacher", "ghost", "chef")
    ]
    greedy = SamplingParams(temperature=0.0, max_tokens=64)
    alone = [bf16_llm.generate([p], greedy)[0].outputs[0].text for p in prompts]
    rng = random.Random(0)
    words = "the of and a to in is you that it he was for on are as with his they at be".split()
    others = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 300))) for _ in range(24)]
    mixed = others[:12] + prompts + others[12:]
    params = [
        greedy
        if m in prompts
        else SamplingParams(temperature=1.0, seed=i, max_tokens=rng.randint(20, 120))
        for i, m in enumerate(mixed)
    ]
    batched = {o.prompt: o.outputs[0].text for o in bf16_llm.generate(mixed, params)}
    assert [batched[p] for p in prompts] == alone
