"""Linear layers: the weight, and the copies its linear backend prepares once (oneDNN-packed
bf16, an int8 copy for --quantization int8, AMX tiles); which kernel a step runs is the
backend's choice (backends/linear.py)."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.model_executor.backends.base import TORCH_BACKEND
from pagedllm.model_executor.backends.linear import quantize_weight_int8


class Linear(nn.Linear):
    linear_backend = TORCH_BACKEND.linear  # bound by the model runner (Backend.bind)
    packed_weight: torch.Tensor | None = None  # oneDNN's blocked bf16 layout
    amx_weight: torch.Tensor | None = None  # amx_linear's tile layout
    int8_weight: torch.Tensor | None = None  # [out, in] int8, with int8_scales [out]
    int8_scales: torch.Tensor | None = None

    def quantize_int8(self) -> None:
        """Keep a per-output-channel symmetric int8 copy of the weight for small steps."""
        self.int8_weight, self.int8_scales = quantize_weight_int8(self.weight)

    def pack(self) -> None:
        """Call once the weight is final (loaded, converted)."""
        self.linear_backend.prepare(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_backend.apply(self, x)


def quantize_linear_weights_int8(model: nn.Module) -> int:
    """Give every Linear an int8 copy of its weight (before packing drops the plain one)."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    for module in linears:
        module.quantize_int8()
    return len(linears)


def pack_linear_weights(model: nn.Module, keep_plain: tuple[nn.Module, ...] = ()) -> int:
    """Pre-pack every Linear's weight and drop the plain copy unless another module shares it
    (a tied lm_head's weight is the embedding table) or the module is in ``keep_plain``.
    Returns how many were packed."""
    shared = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    shared |= {m.weight.data_ptr() for m in keep_plain}
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack()
            if module.packed_weight is None:
                continue
            count += 1
            if module.weight.data_ptr() not in shared:
                module.weight.data = module.weight.data.new_empty(0)
    return count
