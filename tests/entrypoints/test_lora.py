"""Multi-LoRA offline: adapters made here with peft, base model and two adapters in one batch,
each greedy-identical to peft's merged model (fp32): on the tiny Llama (also at tensor
parallel 2) and on SmolLM2; the prefix cache never crosses adapters; max_loras bounds a step;
bad adapters are clear ValueErrors."""

from __future__ import annotations

import json

import pytest

from pagedllm import LLM, LoRARequest, SamplingParams
from tests.utils import assert_no_leak, hf_greedy, load_hf_model, make_lora_adapter

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
TINY_PROMPTS = [list(range(5, 22)), [30, 40, 50], [100, 101, 102, 103, 104]]


@pytest.fixture(scope="module")
def tiny_adapters(tiny_llama_dir, tmp_path_factory):
    """-> (base HF model, {LoRARequest: merged HF model})."""
    base = load_hf_model(tiny_llama_dir)
    root = tmp_path_factory.mktemp("tiny_loras")
    merged = {}
    for i, name in enumerate(["alpha", "beta"], start=1):
        path = root / name
        merged[LoRARequest(name, i, str(path))] = make_lora_adapter(base, path, seed=i)
    return base, merged


def _check_mixed_batch(llm, base, merged, prompts, max_tokens):
    """Every prompt under the base model and each adapter, all in one generate call."""
    loras = [None, *merged]
    all_prompts = [p for _ in loras for p in prompts]
    all_loras = [lora for lora in loras for _ in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(all_prompts, params, use_tqdm=False, lora_request=all_loras)
    by_model: dict = {}
    for prompt, lora, out in zip(all_prompts, all_loras, outs):
        ref = hf_greedy(merged[lora] if lora else base, prompt, max_tokens)
        assert out.outputs[0].token_ids == ref, (lora, prompt)
        by_model.setdefault(lora, []).append(out.outputs[0].token_ids)
    # the adapters really change the output
    for lora in merged:
        assert by_model[lora] != by_model[None]


def test_tiny_mixed_batch_matches_peft(tiny_llama_dir, tiny_adapters):
    base, merged = tiny_adapters
    llm = LLM(tiny_llama_dir, dtype="float32", enable_lora=True, num_kv_blocks=256)
    _check_mixed_batch(llm, base, merged, TINY_PROMPTS, 12)
    assert_no_leak(llm.engine)
    assert llm.engine.list_loras() == {1, 2}


def test_tiny_tensor_parallel_2_matches_peft(tiny_llama_dir, tiny_adapters):
    """Column-parallel Bs cut to each rank's rows, row-parallel As to its columns."""
    base, merged = tiny_adapters
    llm = LLM(
        tiny_llama_dir,
        dtype="float32",
        enable_lora=True,
        num_kv_blocks=256,
        tensor_parallel_size=2,
    )
    try:
        _check_mixed_batch(llm, base, merged, TINY_PROMPTS[:2], 8)
    finally:
        llm.shutdown()


def test_prefix_cache_never_crosses_adapters(tiny_llama_dir, tiny_adapters):
    _, merged = tiny_adapters
    alpha, beta = list(merged)
    llm = LLM(tiny_llama_dir, dtype="float32", enable_lora=True, num_kv_blocks=256)
    prompt = list(range(3, 3 + 64))  # four full blocks of 16

    def cached(lora):
        return llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=lora)[0].num_cached_tokens

    assert cached(alpha) == 0
    assert cached(alpha) == 48  # its own blocks (the last one is always recomputed)
    assert cached(beta) == 0  # same tokens, another adapter: nothing shared
    assert cached(None) == 0  # nor with the base model
    assert cached(None) == 48
    # an adapter unloaded and loaded again never meets its old KV
    assert llm.engine.remove_lora(alpha.lora_int_id)
    assert cached(alpha) == 0
    assert_no_leak(llm.engine)


def test_max_loras_bounds_a_step(tiny_llama_dir, tiny_adapters):
    _, merged = tiny_adapters
    alpha, beta = list(merged)
    llm = LLM(tiny_llama_dir, dtype="float32", enable_lora=True, max_loras=1, num_kv_blocks=256)
    engine = llm.engine
    for i in range(6):
        engine.add_request(str(i), TINY_PROMPTS[1], GREEDY, lora_request=[alpha, beta][i % 2])
    seen_max = 0
    while engine.has_unfinished_requests():
        engine.step()
        running = {r.lora_id for r in engine.scheduler.running}
        seen_max = max(seen_max, len(running))
    assert seen_max == 1
    assert_no_leak(engine)


def test_bad_adapters_are_clear_errors(tiny_llama_dir, tiny_adapters, tmp_path):
    base, merged = tiny_adapters
    llm = LLM(tiny_llama_dir, dtype="float32", enable_lora=True, num_kv_blocks=128)
    with pytest.raises(ValueError, match="not a directory"):
        llm.generate("hi", GREEDY, lora_request=LoRARequest("x", 9, str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        llm.generate("hi", GREEDY, lora_request=LoRARequest("x", 9, str(tmp_path)))
    big = tmp_path / "big"
    make_lora_adapter(base, big, seed=3, rank=32)
    with pytest.raises(ValueError, match="rank 32, more than --max-lora-rank 16"):
        llm.generate("hi", GREEDY, lora_request=LoRARequest("big", 9, str(big)))
    dora = tmp_path / "dora"
    make_lora_adapter(base, dora, seed=4)
    config = json.loads((dora / "adapter_config.json").read_text())
    config["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_dora is not supported"):
        llm.generate("hi", GREEDY, lora_request=LoRARequest("dora", 9, str(dora)))
    alpha = next(iter(merged))
    llm.generate("hi", GREEDY, lora_request=alpha)
    with pytest.raises(ValueError, match="already in use"):
        llm.generate("hi", GREEDY, lora_request=LoRARequest("other", 1, alpha.lora_path + "x"))
    plain = LLM(tiny_llama_dir, dtype="float32", num_kv_blocks=64)
    with pytest.raises(ValueError, match="enable_lora"):
        plain.generate("hi", GREEDY, lora_request=alpha)
    assert_no_leak(llm.engine)
    assert llm.engine.list_loras() <= {1}


def test_smollm2_two_adapters_and_base_match_peft(default_gguf, smol_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol_loras")
    merged = {}
    for i, name in enumerate(["smol-a", "smol-b"], start=1):
        path = root / name
        merged[LoRARequest(name, i, str(path))] = make_lora_adapter(
            smol_hf, path, seed=10 + i, rank=8, std=0.05
        )
    llm = LLM(
        default_gguf,
        dtype="float32",
        enable_lora=True,
        max_model_len=512,
        kv_cache_memory=64 * 2**20,
    )
    tok = llm.get_tokenizer()
    prompts = [
        tok.encode(t)
        for t in ("The capital of France is", "def fibonacci(n):", "Paged attention keeps")
    ]
    _check_mixed_batch(llm, smol_hf, merged, prompts, 16)
    assert_no_leak(llm.engine)
