"""--deterministic on the real SmolLM2 model in bf16: ten greedy requests give the same tokens
run one at a time as inside a busy batch of random requests (sampled and greedy, random
lengths, prompts sharing their prefixes, the targets at random places), with chunked prefill
and prefix-cache hits; then every KV block is free again.

Without --deterministic this does not hold in bf16 on this model (benchmarks/determinism.py
counts how many of the ten differ, and what the mode costs in throughput)."""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM, SamplingParams
from tests.utils import CHAT_PROMPTS, assert_no_leak

STORY = (
    "The lighthouse keeper kept a log of every ship that passed the point, the weather, the "
    "state of the lamp and the birds that rested on the gallery rail. "
)
# Long enough for bf16 rounding to part greedy paths: without --deterministic 2 to 4 of these
# differ inside the busy batches on AMD EPYC Zen 5 (benchmarks/determinism.py).
MAX_TOKENS = 96
TARGETS = [
    *CHAT_PROMPTS[:6],
    "Once upon a time, in a small village,",
    "What are the benefits of exercise?",
    STORY * 12 + "Summarize the keeper's log in one sentence:",  # > 400 tokens: chunked
    "def fibonacci(n):\n    ",
]


def busy_batch(seed: int, vocab: int) -> tuple[list, list[SamplingParams]]:
    rng = random.Random(seed)
    prompts: list = []
    params: list[SamplingParams] = []
    for i in range(30):
        kind = i % 3
        if kind == 0:  # random tokens, sampled
            ids = [rng.randrange(100, vocab) for _ in range(rng.randint(5, 300))]
            prompts.append({"prompt_token_ids": ids})
            params.append(
                SamplingParams(
                    temperature=1.0, seed=rng.randrange(10**6), max_tokens=rng.randint(4, 40)
                )
            )
        elif kind == 1:  # a target's prompt with another ending: shares its prefix blocks
            base = TARGETS[rng.randrange(len(TARGETS))]
            prompts.append(base + " Also, " + rng.choice(["why?", "how?", "answer briefly."]))
            params.append(SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 40)))
        else:  # text, greedy, long or short
            prompts.append(STORY * rng.randint(1, 8) + "Then")
            params.append(SamplingParams(temperature=0.7, top_p=0.9, seed=i, max_tokens=30))
    return prompts, params


@pytest.fixture(scope="module")
def det_llm(default_gguf):
    return LLM(
        default_gguf,
        dtype="bfloat16",
        deterministic=True,
        max_num_batched_tokens=160,
        max_num_seqs=24,
        kv_cache_memory=192 * 2**20,
        max_model_len=1024,
    )


def test_bf16_greedy_output_does_not_depend_on_the_batch(det_llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    alone = [det_llm.generate(p, greedy, use_tqdm=False)[0].outputs[0].token_ids for p in TARGETS]
    assert_no_leak(det_llm.engine)

    vocab = det_llm.engine.model_config.vocab_size
    for seed in (1, 2):
        prompts, params = busy_batch(seed, vocab)
        rng = random.Random(seed)
        places = sorted(rng.sample(range(len(prompts) + len(TARGETS)), len(TARGETS)))
        for place, target in zip(places, TARGETS):
            prompts.insert(place, target)
            params.insert(place, greedy)
        outs = det_llm.generate(prompts, params, use_tqdm=False)
        got = [outs[place].outputs[0].token_ids for place in places]
        differing = [TARGETS[i][:40] for i in range(len(TARGETS)) if got[i] != alone[i]]
        assert not differing, f"seed {seed}: these differ inside the batch: {differing}"
        assert_no_leak(det_llm.engine)
