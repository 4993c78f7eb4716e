"""Engine logits == transformers logits (fp32), for prefill and decode steps, with several
requests of different lengths batched together and with block sizes 1, 16 and 5 (sequences
spanning many blocks), through the real scheduler and KV cache manager."""

from __future__ import annotations

import pytest
import torch

from pagedllm.model_executor.loader import iter_weights, load_hf_config, resolve_model
from pagedllm.model_executor.model_runner import ModelRunner
from pagedllm.model_executor.models.hf_config import arch_config_from_hf
from tests.utils import (
    backend_names,
    check_logits_parity,
    get_backend,
    make_tiny_model_dir,
    native_isa_names,
)

ARCH_VARIANTS = {
    "llama": ("llama", {}),
    "llama_tied_rope_scaled": (
        "llama",
        {
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {}),
    # sliding-window attention: a window of 8 under prompts of up to 40 tokens
    "mistral_window8": ("mistral", {"sliding_window": 8}),
    # Qwen2's sliding window on the layers from max_window_layers on (layer 0 global)
    "qwen2_window8": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    ),
    # 5 sliding layers : 1 global, QK-norm, (1 + w) norms, GeGLU, scaled embeddings
    "gemma3": ("gemma3", {}),
}


@pytest.fixture(scope="module", params=list(ARCH_VARIANTS))
def model_dir(request, tmp_path_factory):
    arch, overrides = ARCH_VARIANTS[request.param]
    return make_tiny_model_dir(tmp_path_factory.mktemp(request.param), arch, **overrides)


def _runner(
    model_dir: str,
    num_blocks: int,
    block_size: int,
    kv_cache_dtype: str,
    backend: str,
    deterministic: bool = False,
) -> ModelRunner:
    source = resolve_model(model_dir)
    arch = arch_config_from_hf(load_hf_config(source))
    runner = ModelRunner(
        arch,
        "float32",
        torch.device("cpu"),
        kv_cache_dtype,
        block_size=block_size,
        backend=get_backend(backend, torch.float32),
        deterministic=deterministic,
    )
    runner.load_weights(iter_weights(source))
    runner.allocate_kv_cache(num_blocks, block_size)
    return runner


@pytest.fixture(params=backend_names())
def backend(request):
    """Each parity case runs on every backend this machine can execute (each ISA's kernels,
    and the pure-torch one)."""
    return request.param


@pytest.mark.parametrize(
    "block_size,max_batched", [(1, 4096), (16, 4096), (5, 24)], ids=["bs1", "bs16", "bs5-chunked"]
)
def test_logits_match_transformers(model_dir, block_size, max_batched, backend):
    _check_parity(model_dir, block_size, max_batched, "auto", backend)


@pytest.mark.parametrize(
    "block_size,max_batched", [(16, 4096), (5, 24)], ids=["bs16", "bs5-chunked"]
)
def test_int8_kv_cache_logits_stay_close(model_dir, block_size, max_batched, backend):
    """--kv-cache-dtype int8: logits within int8 rounding of transformers' fp32 ones, and the
    same greedy tokens."""
    _check_parity(model_dir, block_size, max_batched, "int8", backend)


@pytest.mark.parametrize("isa", native_isa_names())
@pytest.mark.parametrize(
    "block_size,max_batched", [(16, 4096), (5, 24)], ids=["bs16", "bs5-chunked"]
)
def test_deterministic_logits_match_transformers(model_dir, block_size, max_batched, isa):
    """--deterministic (bi_linear, every query row on the decode kernel) computes the same
    model: prefills, chunks over cached blocks and decodes all match transformers (sliding
    windows too: the decode kernel's window)."""
    _check_parity(model_dir, block_size, max_batched, "auto", isa, deterministic=True)


def _check_parity(model_dir, block_size, max_batched, kv_cache_dtype, backend, deterministic=False):
    runner = _runner(
        model_dir, 4096 // block_size, block_size, kv_cache_dtype, backend, deterministic
    )
    check_logits_parity(
        lambda out: runner.forward_logits(out, all_positions=True),
        model_dir,
        block_size,
        max_batched,
        kv_cache_dtype,
    )
