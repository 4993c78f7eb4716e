"""SiLU-gated activation (SwiGLU): silu(gate) * up on the fused gate_up output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.model_executor.ops import use_native


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] (gate | up) -> [T, I]."""
    if use_native(x) and x.is_contiguous():
        return torch.ops.pagedllm.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
