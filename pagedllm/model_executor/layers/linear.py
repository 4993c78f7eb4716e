"""Linear layers. On CPU in bf16 the weights are pre-packed once for oneDNN (AMX / AVX-512-BF16
blocked layout): plain bf16 matmuls re-pack the weight on every call, which made small-batch
decode slower in bf16 than in fp32. Where the CPU has AMX, decode-sized batches run on the native
``amx_linear`` kernel instead, from a second copy of the weight in its tile layout: it streams
the weights from memory faster than oneDNN (ops/csrc/amx_linear.cpp)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.model_executor.ops import amx_available, use_native

# Batch-size hint for the packed layout; measured to serve 1..1024 rows equally well.
PACK_BATCH_HINT = 64
# --quantization int8: steps of at most this many rows use the int8 weights (native
# ops/csrc/int8_linear.cpp, or torch's int8 kernel). Reading the weights bounds such steps and
# int8 halves those bytes; with more rows oneDNN's bf16 GEMM wins (torch's int8 kernel at 8 rows:
# 168 vs 116 us for the 3072x576 gate/up projection).
INT8_MAX_ROWS = 4
NATIVE_INT8_MAX_ROWS = 4  # what ops/csrc/int8_linear.cpp takes (kMaxRows)
# Steps of at most this many rows use amx_linear; above it oneDNN, which also blocks over the
# rows, wins. The model's projections with the weights cold, amx_linear vs oneDNN (ms): 10.7 vs
# 14.2 at 16 rows, 28.3 vs 28.4 at 208, 75.0 vs 86.5 at 528, 155.6 vs 178.9 at 1,024, 194.4 vs
# 201.4 at 1,280, 245.8 vs 212.9 at 1,536, 354.5 vs 275.5 at 2,048.
AMX_LINEAR_MAX_ROWS = 1024


def amx_linear(x: torch.Tensor, amx_weight: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.bfloat16)
    return torch.ops.pagedllm.amx_linear(x if x.stride(1) == 1 else x.contiguous(), amx_weight)


def pack_amx(weight: torch.Tensor) -> torch.Tensor:
    """[n, k] -> the tile layout amx_linear reads:
    wp[nb][kc][r][c][e] = W[16 nb + c][32 kc + 2 r + e]."""
    n, k = weight.shape
    return weight.view(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class Linear(nn.Linear):
    packed_weight: torch.Tensor | None = None
    amx_weight: torch.Tensor | None = None  # for amx_linear (steps of few rows)
    int8_weight: torch.Tensor | None = None  # [out, in] int8, with int8_scales [out]
    int8_scales: torch.Tensor | None = None

    def quantize_int8(self) -> None:
        """Keep a per-output-channel symmetric int8 copy of the weight for small steps."""
        w = self.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.int8_weight = torch.round(w / scales[:, None]).to(torch.int8)
        self.int8_scales = scales

    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if use_native(x) and x.shape[0] <= NATIVE_INT8_MAX_ROWS and x.shape[1] % 16 == 0:
            out = torch.ops.pagedllm.int8_linear(x, self.int8_weight, self.int8_scales)
        else:
            out = torch._weight_int8pack_mm(x, self.int8_weight, self.int8_scales.to(x.dtype))
        return out if self.bias is None else out + self.bias

    def pack(self) -> None:
        """Call once the weight is final (loaded, converted)."""
        if can_pack(self.weight):
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(
                self.weight.detach(), PACK_BATCH_HINT
            )
            n, k = self.weight.shape
            if self.bias is None and n % 32 == 0 and k % 32 == 0 and amx_available():
                self.amx_weight = pack_amx(self.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_weight is not None and x.shape[0] <= INT8_MAX_ROWS:
            return self._int8_forward(x)
        if self.amx_weight is not None and x.dim() == 2 and x.shape[0] <= AMX_LINEAR_MAX_ROWS:
            return amx_linear(x, self.amx_weight)
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x.to(torch.bfloat16), self.packed_weight, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)


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
