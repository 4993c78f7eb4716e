"""RMSNorm, computed in fp32 whatever the activation dtype (as HF Llama does)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """NOTE: with an fp32 residual stream and fp32 weight this is HF's arithmetic exactly;
        ``out_dtype`` casts the result for the (bf16) matmul that follows."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x.to(dtype)
        return out if out_dtype is None else out.to(out_dtype)
