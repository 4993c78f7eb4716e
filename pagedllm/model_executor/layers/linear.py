"""Linear layers. On CPU in bf16 the weights are pre-packed once for oneDNN (AMX / AVX-512-BF16
blocked layout): plain bf16 matmuls re-pack the weight on every call, which made small-batch
decode slower in bf16 than in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Batch-size hint for the packed layout; measured to serve 1..1024 rows equally well.
PACK_BATCH_HINT = 64


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class Linear(nn.Linear):
    packed_weight: torch.Tensor | None = None

    def pack(self) -> None:
        """Call once the weight is final (loaded, converted)."""
        if can_pack(self.weight):
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(
                self.weight.detach(), PACK_BATCH_HINT
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x.to(torch.bfloat16), self.packed_weight, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)


def pack_linear_weights(model: nn.Module) -> int:
    """Pre-pack every Linear's weight and drop the plain copy unless another module shares it
    (a tied lm_head's weight is the embedding table). Returns how many were packed."""
    shared = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
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
