"""Tensor parallelism over worker processes (the mp backend, gloo): the tiny random models'
logits match transformers at TP 2 and 4 (kv heads split at 2, replicated at 4; a vocabulary
that does not divide; tied embeddings; biases), the embedded SmolLM2's greedy tokens at TP 3
equal TP 1's on chat prompts batched, no KV block or request state is left on any rank, and
sizes that cannot be split fail before any worker starts."""

from __future__ import annotations

import time

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from tests.utils import (
    CHAT_PROMPTS,
    assert_no_leak,
    check_logits_parity,
    make_tiny_model_dir,
)

VARIANTS = {
    # 4 heads / 2 kv heads; vocab 321 leaves the last rank a padded row at TP 2 and 4
    "llama_bias_odd_vocab": (
        "llama",
        {"vocab_size": 321, "attention_bias": True, "mlp_bias": True},
    ),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}),
}
CASES = [
    ("llama_bias_odd_vocab", 2),
    ("llama_bias_odd_vocab", 4),
    ("qwen2_tied", 2),
    ("qwen2_tied", 4),
]


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory):
    return {
        name: make_tiny_model_dir(tmp_path_factory.mktemp(name), arch, **kw)
        for name, (arch, kw) in VARIANTS.items()
    }


def _engine(model_dir: str, tp: int, block_size: int = 16, **kw) -> LLMEngine:
    args = EngineArgs(
        model=model_dir,
        dtype="float32",
        tensor_parallel_size=tp,
        block_size=block_size,
        num_kv_blocks=4096 // block_size,
        speculative_config=None,
        **kw,
    )
    return LLMEngine(args)


@pytest.mark.parametrize("variant,tp", CASES, ids=[f"{v}-tp{t}" for v, t in CASES])
def test_logits_match_transformers(variant_dirs, variant, tp):
    engine = _engine(variant_dirs[variant], tp, block_size=5)
    try:
        assert engine.executor.world_size == tp
        # generation through the engine leaves nothing behind on any rank
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        for i in range(6):
            engine.add_request(str(i), list(range(3, 3 + 7 * (i + 1))), params)
        while engine.has_unfinished_requests():
            engine.step()
        engine.step()  # the last finished ids reach the runners with the next step
        assert_no_leak(engine)
        assert engine.executor.collective_rpc("num_request_states", all_ranks=True) == [0] * tp
        # (the parity run's own scheduler leaves its last requests' state behind)
        check_logits_parity(
            lambda out: engine.executor.collective_rpc("forward_logits", out, True)[0],
            variant_dirs[variant],
            block_size=5,
            max_batched=24,  # prompts chunked across steps
        )
    finally:
        engine.shutdown()


@pytest.mark.parametrize("backend", ["mp", "ray"])
def test_smollm2_tp3_greedy_equals_tp1(default_gguf, smol_llm, backend, request):
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    prompts = [
        *CHAT_PROMPTS,
        "Name the planets of the solar system.",
        "Why is the sky blue? Answer briefly.",
    ]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in smol_llm.chat(chats, params, use_tqdm=False)]
    with LLM(
        default_gguf,
        dtype="float32",
        tensor_parallel_size=3,
        distributed_executor_backend=backend,
        kv_cache_memory=64 * 2**20,
        max_model_len=2048,
    ) as llm:
        assert llm.engine.runner.num_kv_heads == 1  # 3 kv heads over 3 ranks
        got = [o.outputs[0].token_ids for o in llm.chat(chats, params, use_tqdm=False)]
        assert got == want
        llm.engine.step()
        assert_no_leak(llm.engine)
        assert llm.engine.executor.collective_rpc("num_request_states", all_ranks=True) == [0] * 3


def test_smollm2_tp3_kept_quantized_greedy_equals_tp1(default_gguf, smol_llm):
    """--quantization gguf at TP 3: q|k|v and gate|up split by rows of blocks, o and down by
    whole blocks of their inputs (192 and 512 columns: 6 and 16 Q4_1 blocks), the Q8_0
    vocabulary by rows; the fp32 greedy tokens are TP 1's with the weights dequantized."""
    chats = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS[:4]]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in smol_llm.chat(chats, params, use_tqdm=False)]
    with LLM(
        default_gguf,
        dtype="float32",
        quantization="gguf",
        tensor_parallel_size=3,
        kv_cache_memory=64 * 2**20,
        max_model_len=2048,
    ) as llm:
        assert llm.engine.runner.model.model.layers[0].self_attn.o_proj.qweight is not None
        got = [o.outputs[0].token_ids for o in llm.chat(chats, params, use_tqdm=False)]
        assert got == want
        llm.engine.step()
        assert_no_leak(llm.engine)


QUANTIZED = {  # method, bits, group, symmetric, act order
    # o/down split by whole groups (32 of 64 inputs per rank)
    "awq_g32": ("awq", 4, 32, False, False),
    # one group per channel, laid out as 64-weight blocks: split into 32-weight blocks
    "ct_int8_channel": ("compressed-tensors", 8, -1, True, False),
}


@pytest.mark.parametrize("fmt", list(QUANTIZED))
def test_quantized_checkpoint_tp2_matches_transformers(fmt, tmp_path):
    """AWQ / compressed-tensors codes split across 2 ranks (q|k|v, gate|up by output rows, o and
    down by input groups) compute transformers' logits on the decoded weights."""
    from tests.quantized_checkpoints import write_quantized_checkpoint
    from tests.utils import load_hf_model, make_tokenizer

    model = load_hf_model(make_tiny_model_dir(tmp_path / "dense", "llama"))
    ckpt, ref = str(tmp_path / "quantized"), str(tmp_path / "reference")
    write_quantized_checkpoint(model, ckpt, *QUANTIZED[fmt])
    model.save_pretrained(ref)
    for d in (ckpt, ref):
        make_tokenizer(d)
    engine = _engine(ckpt, 2, block_size=5)
    try:
        check_logits_parity(
            lambda out: engine.executor.collective_rpc("forward_logits", out, True)[0],
            ref,
            block_size=5,
            max_batched=24,
        )
    finally:
        engine.shutdown()


def test_gptq_act_order_refuses_an_input_split(tmp_path):
    from tests.quantized_checkpoints import write_quantized_checkpoint
    from tests.utils import load_hf_model, make_tokenizer

    model = load_hf_model(make_tiny_model_dir(tmp_path / "dense", "llama"))
    ckpt = str(tmp_path / "gptq")
    write_quantized_checkpoint(model, ckpt, "gptq", 4, 32, False, True)
    make_tokenizer(ckpt)
    with pytest.raises(ValueError, match="act order"):
        _engine(ckpt, 2)


def test_tp2_on_smollm2_fails_fast_naming_the_heads(default_gguf):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 2 .* 9 attention heads and 3 kv"):
        LLM(default_gguf, dtype="float32", tensor_parallel_size=2, kv_cache_memory=2**24)
    assert time.monotonic() - t0 < 30  # no worker was started and waited for


def test_bad_backend_and_bind_are_clear(tiny_llama_dir, monkeypatch):
    with pytest.raises(ValueError, match="--distributed-executor-backend must be one of"):
        _engine(tiny_llama_dir, 2, distributed_executor_backend="mpi")
    with pytest.raises(ValueError, match="uni runs one rank"):
        _engine(tiny_llama_dir, 2, distributed_executor_backend="uni")
    monkeypatch.setenv("PAGEDLLM_CPU_THREADS_BIND", "0|1|0")
    with pytest.raises(ValueError, match="PAGEDLLM_CPU_THREADS_BIND lists 3 ranks"):
        _engine(tiny_llama_dir, 2)
