"""AWQ, GPTQ and compressed-tensors checkpoints of the real SmolLM2-135M (its fp32 weights
quantized here: AWQ 4-bit g64, GPTQ 4-bit g64 with act order in the original v1 format,
compressed-tensors int4 g32 symmetric and int8 per channel, the latter two packed by the
compressed-tensors library) load with their method read from config.json, keep their codes
packed (no dense projection weight in memory), and compute what transformers computes from
the weights the codes decode to: greedy tokens identical on the six chat prompts, batched, and
the top log-probabilities within 1e-3. No KV block is left behind."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import AutoTokenizer

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.layers.linear import Linear
from tests.quantized_checkpoints import write_quantized_checkpoint
from tests.utils import CHAT_PROMPTS, assert_no_leak, hf_greedy

NUM_TOKENS = 24
FORMATS = {  # method, bits, group, symmetric, act order (hidden 576 = 9 x 64)
    "awq_g64": ("awq", 4, 64, False, False),
    "gptq4_g64_act_order": ("gptq", 4, 64, False, True),
    "ct_int4_g32": ("compressed-tensors", 4, 32, True, False),
    "ct_int8_channel": ("compressed-tensors", 8, -1, True, False),
}


@pytest.fixture(scope="module", params=list(FORMATS))
def quantized(request, smol_hf, default_gguf, tmp_path_factory):
    """(LLM on the checkpoint, transformers on the decoded weights, the format)."""
    method, bits, group, sym, act_order = FORMATS[request.param]
    reference = copy.deepcopy(smol_hf)
    ckpt = str(tmp_path_factory.mktemp(request.param))
    write_quantized_checkpoint(reference, ckpt, method, bits, group, sym, act_order)
    d, f = os.path.split(default_gguf)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(ckpt)
    llm = LLM(ckpt, dtype="float32", kv_cache_memory=256 * 2**20, max_model_len=2048)
    yield llm, reference.eval(), FORMATS[request.param]
    del llm


def test_codes_stay_packed(quantized):
    llm, _, (method, bits, _, _, act_order) = quantized
    assert llm.engine.quantization == method
    model = llm.engine.executor.runner.model
    projections = [m for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head]
    assert len(projections) == 30 * 4  # q|k|v, o, gate|up, down per layer
    assert all(m.qweight is not None and m.weight.numel() == 0 for m in projections)
    packed = sum(part.data.numel() for m in projections for part in m.qweight)
    weights = sum(m.in_features * m.out_features for m in projections)
    # b bits per weight plus 8 bytes of scale and offset per group of 32..128
    assert packed <= weights * (bits / 8 + 8 / 32), (packed, weights)
    assert any(part.perm is not None for m in projections for part in m.qweight) == act_order


def test_greedy_batched_matches_transformers_on_the_decoded_weights(quantized):
    llm, reference, _ = quantized
    ids = [llm.apply_chat_template([{"role": "user", "content": p}])[1] for p in CHAT_PROMPTS]
    greedy = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], greedy, use_tqdm=False)
    for prompt_ids, out in zip(ids, outs):
        assert out.outputs[0].token_ids == hf_greedy(reference, prompt_ids, NUM_TOKENS)
    assert_no_leak(llm.engine)


def test_logprobs_within_1e_3_of_transformers(quantized):
    llm, reference, _ = quantized
    ids = llm.apply_chat_template([{"role": "user", "content": CHAT_PROMPTS[2]}])[1]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    comp = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(reference(torch.tensor([ids + comp.token_ids])).logits[0], -1)
    for step, entry in enumerate(comp.logprobs):
        top = ref[len(ids) - 1 + step].topk(3)
        for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(entry[tid].logprob - lp) < 1e-3
