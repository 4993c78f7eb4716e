"""Test helpers: build tiny random-weight models with transformers, and check for KV leaks."""

from __future__ import annotations

import os

import torch

TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Paged attention keeps the KV cache in blocks. "
    "Continuous batching re-forms the batch at every step. 0123456789 hello world! "
) * 20


# Chat prompts for the real SmolLM2 model's parity tests.
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish and German.",
    "def fibonacci(n): # complete this Python function",
]


def make_tokenizer(out_dir: str, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TINY_CORPUS], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(arch: str, **overrides):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**{"sliding_window": None, **common})
    if arch == "gemma3":
        # 6 layers: 5 sliding (window 8, RoPE base 10k) and 1 global (base 1M), 1 kv head
        gemma = dict(
            num_hidden_layers=6,
            num_key_value_heads=1,
            head_dim=32,
            sliding_window=8,
            query_pre_attn_scalar=24,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            pad_token_id=0,
        )
        return Gemma3TextConfig(**{**common, **gemma, **overrides})
    raise ValueError(arch)


def make_tiny_model_dir(out_dir, arch: str = "llama", seed: int = 0, **overrides) -> str:
    from transformers import AutoModelForCausalLM

    out_dir = str(out_dir)
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-default init so logits are far from uniform and greedy choices are stable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
            elif arch == "gemma3" and name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)  # Gemma's norms multiply by 1 + w: w = 0 would hide it
    model.save_pretrained(out_dir)
    make_tokenizer(out_dir)
    return out_dir


def load_hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def load_runner(path: str, backend: str, block_size: int, quantization: str | None = None):
    """A fp32 ModelRunner on ``backend`` holding the model at ``path`` (a quantized checkpoint's
    method read from its config), with ``4096 // block_size`` KV blocks."""
    from pagedllm.model_executor.loader import (
        iter_weights,
        load_hf_config,
        resolve_model,
        resolve_quantization,
    )
    from pagedllm.model_executor.model_runner import ModelRunner
    from pagedllm.model_executor.models.hf_config import arch_config_from_hf

    source = resolve_model(path)
    arch = arch_config_from_hf(load_hf_config(source))
    quantization = resolve_quantization(source, quantization)
    runner = ModelRunner(
        arch,
        "float32",
        torch.device("cpu"),
        "auto",
        quantization,
        block_size=block_size,
        backend=get_backend(backend, torch.float32),
    )
    runner.load_weights(iter_weights(source, quantization))
    runner.allocate_kv_cache(4096 // block_size, block_size)
    return runner


def check_logits_parity(forward, model_dir, block_size, max_batched, kv_cache_dtype="auto"):
    """Run 4 requests of different lengths through the real scheduler, with ``forward(out) ->
    (step requests, every scheduled token's fp32 logits)`` as the model (a runner holding
    ``4096 // block_size`` blocks), and compare each position's logits and the greedy tokens
    with transformers'."""
    from pagedllm.config import SchedulerConfig
    from pagedllm.engine.kv_cache_manager import KVCacheManager
    from pagedllm.engine.request import Request
    from pagedllm.engine.scheduler import Scheduler
    from pagedllm.sampling_params import SamplingParams
    from pagedllm.scheduler_output import ModelRunnerOutput, SampledToken

    torch.manual_seed(1)
    hf = load_hf_model(model_dir)
    prompt_lens = [3, 17, 40, 1]
    num_decode_steps = 6
    kv = KVCacheManager(4096 // block_size, block_size, enable_caching=True)
    sched = Scheduler(SchedulerConfig(8, max_batched, 512), kv)
    requests = []
    for i, n in enumerate(prompt_lens):
        ids = torch.randint(3, 320, (n,)).tolist()
        params = SamplingParams(temperature=0.0, max_tokens=num_decode_steps, ignore_eos=True)
        req = Request(f"r{i}", ids, params)
        sched.add_request(req)
        requests.append(req)

    ours: dict[str, dict[int, torch.Tensor]] = {r.req_id: {} for r in requests}
    while sched.has_unfinished_requests():
        out = sched.schedule()
        steps, logits = forward(out)
        row = 0
        sampled = {}
        for s in steps:
            for j in range(s.num_tokens):
                ours[s.req_id][s.start_pos + j] = logits[row + j]
            if s.needs_sample:
                sampled[s.req_id] = [SampledToken(int(logits[row + s.num_tokens - 1].argmax()))]
            row += s.num_tokens
        sched.update_from_output(out, ModelRunnerOutput(sampled))

    for req in requests:
        full = torch.tensor([req.all_token_ids])
        with torch.no_grad():
            ref = hf(full).logits[0]
        got = ours[req.req_id]
        # every position but the newest (never fed back) was computed exactly once
        assert sorted(got) == list(range(req.num_tokens - 1))
        mine = torch.stack([got[p] for p in range(req.num_tokens - 1)])
        greedy = ref[req.num_prompt_tokens - 1 :].argmax(-1).tolist()[:num_decode_steps]
        if kv_cache_dtype == "auto":
            torch.testing.assert_close(mine, ref[: req.num_tokens - 1], rtol=1e-4, atol=1e-4)
            # greedy tokens chosen from our logits are transformers' greedy tokens
            assert req.output_token_ids == greedy
            continue
        # int8: measured 0.04-0.07 with logits up to ~4.5 (steps of max|x| / 127 per head)
        err = (mine - ref[: req.num_tokens - 1]).abs().max().item()
        assert err < 0.15, err
        # the same greedy tokens, except where transformers' top two are within that error
        ref_rows = ref[req.num_prompt_tokens - 1 :][:num_decode_steps]
        for row, ours_tok, ref_tok in zip(ref_rows, req.output_token_ids, greedy):
            assert ours_tok == ref_tok or row[ref_tok] - row[ours_tok] < 2 * err


def assert_no_leak(engine) -> None:
    """Every block is free (blocks only the prefix cache remembers count as free: evictable)."""
    kv = engine.kv_cache_manager
    assert not engine.has_unfinished_requests()
    assert not kv.req_to_blocks, f"blocks still held by {list(kv.req_to_blocks)}"
    assert kv.num_free_blocks == kv.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def backend_names() -> list[str]:
    """Every backend this machine runs (best ISA first, torch last): tests that take a backend
    run once per name, so each ISA's kernels are tested wherever the CPU can execute them."""
    from pagedllm.model_executor.backends import available_backends

    return [b.name for b in available_backends()]


def get_backend(name: str, dtype: torch.dtype = torch.float32):
    from pagedllm.model_executor.backends import TORCH_BACKEND
    from pagedllm.model_executor.backends.selector import native_backend

    if name == "torch":
        return TORCH_BACKEND
    backend = native_backend(name, dtype)
    assert backend is not None, f"the {name} kernels are not built"
    return backend


def native_isa_names() -> list[str]:
    """The native ISAs this machine builds and runs (avx2 on any x86-64-v3 CPU)."""
    return [name for name in backend_names() if name != "torch"]


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora_adapter(base_model, out_dir, seed: int, rank: int = 8, std: float = 0.3, **config):
    """A peft LoRA adapter on (a copy of) ``base_model`` with random, non-zero B (peft starts
    B at zero, which would change nothing), saved to ``out_dir``; -> peft's merged model (the
    reference: the base weights plus scale * B @ A)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=config.pop("lora_alpha", 2 * rank),
        target_modules=config.pop("target_modules", LORA_TARGETS),
        lora_dropout=0.0,
        **config,
    )
    peft_model = get_peft_model(copy.deepcopy(base_model), lora_config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(str(out_dir))
    return peft_model.merge_and_unload().eval()
