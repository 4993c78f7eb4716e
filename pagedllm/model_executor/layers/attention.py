"""PagedAttention: the layer that writes a step's K/V into their cache slots and attends through
the block tables, on the attention backend the model runner bound (backends/: torch, or one
ISA's native kernels). The cache layouts are described in backends/torch_attention.py."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.model_executor.backends.attention_metadata import AttentionMetadata
from pagedllm.model_executor.backends.base import TORCH_BACKEND


class PagedAttention(nn.Module):
    attention_backend = TORCH_BACKEND.attention  # bound by the model runner (Backend.bind)

    def __init__(self, scale: float, sliding_window: int | None = None) -> None:
        """``sliding_window``: this layer attends only to its last that many keys."""
        super().__init__()
        self.scale = scale
        self.sliding_window = sliding_window
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # bound by the runner

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]."""
        assert self.kv_cache is not None, "KV cache not bound"
        k_cache, v_cache = self.kv_cache
        backend = self.attention_backend
        backend.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return backend.forward(q, k, v, k_cache, v_cache, meta, self.scale, self.sliding_window)
