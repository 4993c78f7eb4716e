"""Gated activations (SwiGLU, GeGLU) as modules, so that they hold the backend's kernels."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.model_executor.backends.base import TORCH_BACKEND


class SiluAndMul(nn.Module):
    kernels = TORCH_BACKEND.kernels  # bound by the model runner (Backend.bind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, 2 * I] (gate | up) -> [T, I]."""
        return self.kernels.silu_and_mul(x)


class GeluTanhAndMul(nn.Module):
    """GeGLU with the tanh approximation of GELU (Gemma's gelu_pytorch_tanh)."""

    kernels = TORCH_BACKEND.kernels  # bound by the model runner (Backend.bind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, 2 * I] (gate | up) -> [T, I]."""
        return self.kernels.gelu_tanh_and_mul(x)
