"""``iter_weights``: a model's (HF parameter name, tensor) pairs, whatever its storage format."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pagedllm.model_executor.layers.quant_tensor import QuantTensor
from pagedllm.model_executor.loader.gguf_weights import iter_gguf_weights
from pagedllm.model_executor.loader.hf_weights import iter_hf_weights
from pagedllm.model_executor.loader.quantized_hf_weights import (
    QUANT_METHODS,
    iter_quantized_hf_weights,
    parse_quantization_config,
    read_quantization_config,
)
from pagedllm.model_executor.loader.source import ModelSource


def iter_weights(
    source: ModelSource, quantization: str | None = None
) -> Iterator[tuple[str, torch.Tensor | QuantTensor]]:
    """Stream the weights under HF checkpoint names (``model.layers.0.self_attn.q_proj.weight``).

    GGUF tensors come dequantized to float32 with llama.cpp's q/k permutation undone (with
    ``quantization="gguf"``, the quantized ones as QuantTensor blocks); HF tensors come as
    stored, but for an AWQ/GPTQ/compressed-tensors checkpoint's quantized layers, which come as
    one QuantTensor each. ``lm_head.weight`` appears only when the checkpoint has it (not when
    tied). ``quantization`` is what resolve_quantization returned.
    """
    if source.gguf_file is not None:
        return iter_gguf_weights(source.gguf_file, keep_quantized=quantization == "gguf")
    if quantization in QUANT_METHODS:
        qconfig = parse_quantization_config(read_quantization_config(source.path), source.path)
        return iter_quantized_hf_weights(iter_hf_weights(source.path), qconfig)
    return iter_hf_weights(source.path)


def resolve_quantization(source: ModelSource, requested: str | None) -> str | None:
    """The quantization the model runs with: a quantized checkpoint's own method (as vLLM, from
    its config.json), else what was asked for; a ValueError when the two disagree."""
    if requested == "gguf" and source.gguf_file is None:
        raise ValueError(
            f"--quantization gguf keeps a GGUF file's blocks; {source.path} is not a GGUF model"
        )
    qconfig = read_quantization_config(source.path) if source.gguf_file is None else None
    if qconfig is None:
        if requested in QUANT_METHODS:
            raise ValueError(
                f"--quantization {requested} runs a {requested} checkpoint; {source.path} has no"
                " quantization_config in its config.json"
            )
        return requested
    method = parse_quantization_config(qconfig, source.path).method
    if requested not in (None, method):
        raise ValueError(
            f"{source.path} is a {method} checkpoint; --quantization {requested} does not apply"
            f" to it (leave it unset, or pass {method})"
        )
    return method
