"""``iter_weights``: a model's (HF parameter name, tensor) pairs, whatever its storage format."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pagedllm.model_executor.loader.gguf_weights import iter_gguf_weights
from pagedllm.model_executor.loader.hf_weights import iter_hf_weights
from pagedllm.model_executor.loader.source import ModelSource


def iter_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the weights under HF checkpoint names (``model.layers.0.self_attn.q_proj.weight``).

    GGUF tensors come dequantized to float32 with llama.cpp's q/k permutation undone; HF tensors
    come as stored. ``lm_head.weight`` appears only when the checkpoint has it (not when tied).
    """
    if source.gguf_file is not None:
        return iter_gguf_weights(source.gguf_file)
    return iter_hf_weights(source.path)
