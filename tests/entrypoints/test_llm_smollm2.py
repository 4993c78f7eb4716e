"""The real SmolLM2-135M-Instruct GGUF through the offline API: greedy parity with transformers
(which loads and dequantizes the same GGUF itself), alone and batched, plus chat basics."""

from __future__ import annotations

import pytest
import torch

from pagedllm import SamplingParams
from tests.utils import CHAT_PROMPTS, assert_no_leak, hf_greedy

NUM_TOKENS = 64


@pytest.fixture(scope="module")
def chat_ids(smol_llm):
    return [smol_llm.apply_chat_template([{"role": "user", "content": p}])[1] for p in CHAT_PROMPTS]


@pytest.fixture(scope="module")
def hf_outputs(smol_hf, chat_ids):
    return [hf_greedy(smol_hf, ids, NUM_TOKENS) for ids in chat_ids]


def _greedy(n=NUM_TOKENS, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def test_greedy_batched_matches_transformers(smol_llm, chat_ids, hf_outputs):
    outs = smol_llm.generate(
        [{"prompt_token_ids": ids} for ids in chat_ids], _greedy(), use_tqdm=False
    )
    for out, ref in zip(outs, hf_outputs):
        assert out.outputs[0].token_ids == ref
    assert_no_leak(smol_llm.engine)


def test_greedy_one_at_a_time_matches_transformers(smol_llm, chat_ids, hf_outputs):
    for ids, ref in zip(chat_ids, hf_outputs):
        out = smol_llm.generate({"prompt_token_ids": ids}, _greedy(), use_tqdm=False)[0]
        assert out.outputs[0].token_ids == ref
    assert_no_leak(smol_llm.engine)


def test_logprobs_match_transformers(smol_llm, smol_hf, chat_ids):
    ids = chat_ids[0]
    out = smol_llm.generate({"prompt_token_ids": ids}, _greedy(8, logprobs=3), use_tqdm=False)[0]
    comp = out.outputs[0]
    full = torch.tensor([ids + comp.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(smol_hf(full).logits[0].float(), dim=-1)
    for step, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(ids) - 1 + step]
        assert entry[tok].rank == 1
        top = row.topk(3)
        assert list(entry)[:1] == [tok] or tok in entry
        for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(entry[tid].logprob - lp) < 1e-3


def test_chat_answers_are_coherent(smol_llm):
    out = smol_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=30),
        use_tqdm=False,
    )[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ends with <|im_end|>, not the length cap
    assert out.prompt.startswith("<|im_start|>")


def test_utf8_is_never_broken_while_streaming(smol_llm):
    """Emoji and accented text span several byte-level tokens; no U+FFFD may appear."""
    engine = smol_llm.engine
    text = "Café 🚀 naïve 日本語"
    ids = smol_llm.get_tokenizer().encode(text)
    # Force the model to "generate" exactly these tokens by checking the detokenizer directly.
    from pagedllm.engine.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(engine.tokenizer, [1, 2, 3], SamplingParams())
    seen = []
    for t in ids:
        detok.update([t])
        seen.append(detok.output_text(finished=False))
    assert all("\ufffd" not in s for s in seen)
    assert seen[-1] == text
    assert all(seen[i + 1].startswith(seen[i]) for i in range(len(seen) - 1))
