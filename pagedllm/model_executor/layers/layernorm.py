"""RMSNorm, computed in fp32 whatever the activation dtype (as HF Llama does), with the residual
add fused in (``add_and_norm``) so the fp32 residual stream is updated in place."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.model_executor.backends.base import TORCH_BACKEND


class RMSNorm(nn.Module):
    kernels = TORCH_BACKEND.kernels  # bound by the model runner (Backend.bind)

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """NOTE: with an fp32 residual stream and fp32 weight this is HF's arithmetic;
        ``out_dtype`` casts the result for the (bf16) matmul that follows."""
        return self.kernels.rms_norm(x, self.weight, self.eps, out_dtype or x.dtype)

    def add_and_norm(
        self, residual: torch.Tensor, delta: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """``residual += delta`` in place (fp32), then the norm of the new residual."""
        return self.kernels.add_rms_norm(residual, delta, self.weight, self.eps, out_dtype)
