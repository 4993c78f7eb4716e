"""RMSNorm, computed in fp32 whatever the activation dtype (as HF Llama does), with the residual
add fused in (``add_and_norm``) so the fp32 residual stream is updated in place."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.model_executor.ops import use_native


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """NOTE: with an fp32 residual stream and fp32 weight this is HF's arithmetic;
        ``out_dtype`` casts the result for the (bf16) matmul that follows."""
        out_dtype = out_dtype or x.dtype
        if x.dtype == torch.float32 and x.is_contiguous() and use_native(x):
            out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
            torch.ops.pagedllm.rms_norm(x, self.weight, self.eps, out)
            return out
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x.to(dtype)).to(out_dtype)

    def add_and_norm(
        self, residual: torch.Tensor, delta: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """``residual += delta`` in place (fp32), then the norm of the new residual."""
        if use_native(residual) and delta.is_contiguous():
            out = torch.empty(residual.shape, dtype=out_dtype, device=residual.device)
            torch.ops.pagedllm.fused_add_rms_norm(residual, delta, self.weight, self.eps, out)
            return out
        residual.add_(delta.float())
        return self(residual, out_dtype)
