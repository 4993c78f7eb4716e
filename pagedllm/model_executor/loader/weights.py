"""``iter_weights``: a model's (HF parameter name, tensor) pairs, whatever its storage format."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pagedllm.model_executor.layers.gguf_tensor import GGUFTensor
from pagedllm.model_executor.loader.gguf_weights import iter_gguf_weights
from pagedllm.model_executor.loader.hf_weights import iter_hf_weights
from pagedllm.model_executor.loader.source import ModelSource


def iter_weights(
    source: ModelSource, quantization: str | None = None
) -> Iterator[tuple[str, torch.Tensor | GGUFTensor]]:
    """Stream the weights under HF checkpoint names (``model.layers.0.self_attn.q_proj.weight``).

    GGUF tensors come dequantized to float32 with llama.cpp's q/k permutation undone (with
    ``quantization="gguf"``, the quantized ones as GGUFTensor blocks); HF tensors come as
    stored. ``lm_head.weight`` appears only when the checkpoint has it (not when tied).
    """
    check_quantization_source(source, quantization)
    if source.gguf_file is not None:
        return iter_gguf_weights(source.gguf_file, keep_quantized=quantization == "gguf")
    return iter_hf_weights(source.path)


def check_quantization_source(source: ModelSource, quantization: str | None) -> None:
    if quantization == "gguf" and source.gguf_file is None:
        raise ValueError(
            f"--quantization gguf keeps a GGUF file's blocks; {source.path} is not a GGUF model"
        )
