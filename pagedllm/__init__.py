"""pagedllm: a paged-KV-cache LLM inference and serving engine."""

from pagedllm.config import EngineArgs
from pagedllm.lora import LoRARequest
from pagedllm.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestOutput,
)
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "EngineArgs",
    "SamplingParams",
    "StructuredOutputsParams",
    "PoolingParams",
    "LoRARequest",
    "EmbeddingRequestOutput",
    "EmbeddingOutput",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "__version__",
]


def __getattr__(name: str):
    # Import the engine lazily: `import pagedllm` stays cheap (no torch) for tools and the CLI.
    if name == "LLM":
        from pagedllm.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
