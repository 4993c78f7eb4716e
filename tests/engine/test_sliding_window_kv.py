"""A model whose every layer slides (Mistral, window 8) frees the KV blocks behind the window:
sequences far longer than the whole KV pool run, several at once (preempting each other when
the pool runs short), with transformers' greedy tokens, and leave every block free."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from tests.utils import assert_no_leak, hf_greedy, load_hf_model, make_tiny_model_dir

POOL = dict(block_size=4, num_kv_blocks=12, max_num_batched_tokens=16)  # 48 tokens of KV


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("mistral_w8"), "mistral", sliding_window=8)


@pytest.mark.parametrize("drafts", [None, "auto"], ids=["drafts-off", "drafts-auto"])
def test_sequences_longer_than_the_pool_match_transformers(mistral_dir, drafts):
    llm = LLM(mistral_dir, dtype="float32", max_model_len=400, speculative_config=drafts, **POOL)
    kv = llm.engine.kv_cache_manager
    assert kv.sliding_window == 8 and kv.num_blocks * kv.block_size == 48
    prompts = [[3 + (7 * i + j) % 250 for j in range(n)] for i, n in enumerate((60, 90, 30))]
    params = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf = load_hf_model(mistral_dir)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 80)
    assert_no_leak(llm.engine)


def test_a_model_with_global_layers_keeps_every_block(mistral_dir, tiny_llama_dir):
    """Llama reads every earlier key: the same pool cannot hold a 400-token sequence."""
    with pytest.raises(ValueError, match="cannot hold one sequence of max_model_len=400"):
        LLM(tiny_llama_dir, dtype="float32", max_model_len=400, **POOL)
