"""Model loading: find a model (local dir, .gguf, hub repo, embedded default), read its config,
tokenizer and weights with Hugging Face parameter names."""

from pagedllm.model_executor.loader.config import load_hf_config
from pagedllm.model_executor.loader.default_model import DEFAULT_MODEL_NAME, ensure_default_model
from pagedllm.model_executor.loader.source import ModelSource, resolve_model
from pagedllm.model_executor.loader.tokenizer import load_tokenizer
from pagedllm.model_executor.loader.weights import iter_weights, resolve_quantization

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ModelSource",
    "ensure_default_model",
    "iter_weights",
    "resolve_quantization",
    "load_hf_config",
    "load_tokenizer",
    "resolve_model",
]
