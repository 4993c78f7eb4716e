"""Test helpers: build tiny random-weight models with transformers, and check for KV leaks."""

from __future__ import annotations

import os

import torch

TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Paged attention keeps the KV cache in blocks. "
    "Continuous batching re-forms the batch at every step. 0123456789 hello world! "
) * 20


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
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

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
        return MistralConfig(sliding_window=None, **common)
    raise ValueError(arch)


def make_tiny_model_dir(out_dir, arch: str = "llama", seed: int = 0, **overrides) -> str:
    from transformers import AutoModelForCausalLM

    out_dir = str(out_dir)
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-default init so logits are far from uniform and greedy choices are stable.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model.save_pretrained(out_dir)
    make_tokenizer(out_dir)
    return out_dir


def load_hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


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
