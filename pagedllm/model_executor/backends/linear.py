"""Linear backends: how a Linear layer's weight is prepared once (packed, quantized copies) and
which kernel each step's matmul runs, by its row count.

TorchLinearBackend: on CPU the weight is pre-packed once for oneDNN's blocked layout, in bf16
(plain bf16 matmuls re-pack it on every call, which made small-batch decode slower in bf16 than
in fp32) where the CPU has bf16 dot products (AVX512-BF16, AMX); elsewhere a bf16 weight is
widened and packed in fp32, at twice the bytes: each product of two bf16 is exact in fp32, so
this is the sum a bf16 GEMM makes, on FMAs instead of oneDNN's bf16 emulation (576->3072 at 16,
128, 512 rows: 0.88 vs 2.53, 5.1 vs 19.1, 24.3 vs 80.0 ms; Intel Xeon model 207 with
AVX-512 but no AVX512-BF16). fp32 weights are packed too (against F.linear, the model's
projections on AMD EPYC Zen 4: 8.9 vs 16.7 ms at 16 rows, 37.6 vs 74.5 at 128, 148 vs 187 at
512, 621 vs 796 at 2,048);
``--quantization int8`` steps of few rows use torch's int8 kernel; ``--quantization gguf``
and AWQ/GPTQ/compressed-tensors weights are decoded to dense ones once (it has no kernel for
quantized blocks).
NativeLinearBackend adds one ISA's kernels: ``small_linear`` for fp32 steps of few rows (it
streams the row-major weight: generic/small_linear.cpp), the int8 kernel for those small steps,
on AMX ``amx_linear`` for decode-sized steps, from a second copy of the weight in its tile
layout (it streams the weights faster than oneDNN: x86/amx/amx_linear.cpp), and
``quant_linear`` for weights kept quantized: GGUF blocks, AWQ/GPTQ/compressed-tensors groups
(generic/quant_linear.cpp).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pagedllm.cpu_info import has_native_bf16, onednn_packs_bf16
from pagedllm.model_executor.ops.native import NativeOps

# Batch-size hint for the packed layout; measured to serve 1..1024 rows equally well.
PACK_BATCH_HINT = 64
# --quantization int8: steps of at most this many rows use the int8 weights. Reading the weights
# bounds such steps and int8 halves those bytes; with more rows oneDNN's bf16 GEMM wins (torch's
# int8 kernel at 8 rows: 168 vs 116 us for the 3072x576 gate/up projection).
INT8_MAX_ROWS = 4
# The most rows the native int8 kernel takes (kMaxRows, generic/int8_linear.cpp).
INT8_KERNEL_MAX_ROWS = 4
# fp32 steps of at most this many rows use small_linear, which streams the row-major weight at
# DRAM speed while oneDNN's packed GEMM leaves bandwidth unused. The model's projections +
# lm_head, SmolLM2-135M fp32, weights cold, small_linear vs oneDNN (ms, medians of 9, Intel
# Xeon model 207 without AVX512-BF16):
# AVX-512 27.7 vs 30.2 at 1 row, 33.8 vs 42.6 at 4, 38.8 vs 49.7 at 16, 50.6 vs 52.8 at 24,
# 59.9 vs 59.0 at 32; AVX2 (both) 26.8 vs 34.2 at 1, 61.4 vs 65.5 at 16, 100.6 vs 87.9 at 32.
# Steps past 15 rows are padded to multiples of 16 (input_batch.padded_rows): 16 is the bound.
SMALL_LINEAR_MAX_ROWS = 16
# Steps of at most this many rows use amx_linear; above it oneDNN, which also blocks over the
# rows, wins. The model's projections with the weights cold, amx_linear vs oneDNN (ms): 10.7 vs
# 14.2 at 16 rows, 28.3 vs 28.4 at 208, 75.0 vs 86.5 at 528, 155.6 vs 178.9 at 1,024, 194.4 vs
# 201.4 at 1,280, 245.8 vs 212.9 at 1,536, 354.5 vs 275.5 at 2,048.
AMX_LINEAR_MAX_ROWS = 1024


def pack_amx(weight: torch.Tensor) -> torch.Tensor:
    """[n, k] -> the tile layout amx_linear reads:
    wp[nb][kc][r][c][e] = W[16 nb + c][32 kc + 2 r + e]."""
    n, k = weight.shape
    return weight.view(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: W ~ q * scales[:, None]."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scales[:, None]).to(torch.int8), scales


class TorchLinearBackend:
    name = "torch"
    int8_max_rows = INT8_MAX_ROWS
    # Whether steps pad their rows to buckets (input_batch.padded_rows): oneDNN builds a GEMM
    # kernel for every new row count of packed weights.
    pads_rows = True

    def describe(self) -> str:
        widened = "" if has_native_bf16() else ", bf16 ones widened to fp32"
        return f"oneDNN (packed weights{widened})"

    def can_pack(self, weight: torch.Tensor) -> bool:
        return (
            weight.device.type == "cpu"
            and (
                weight.dtype == torch.float32
                or (weight.dtype == torch.bfloat16 and onednn_packs_bf16())
                or self.widens(weight)
            )
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        )

    @staticmethod
    def widens(weight: torch.Tensor) -> bool:
        """A bf16 weight on a CPU without bf16 dot products is packed in fp32."""
        return weight.dtype == torch.bfloat16 and not has_native_bf16()

    def prepare(self, layer: Any) -> None:
        """Once the weight is final (loaded, converted): the packed copies this backend runs."""
        if layer.qweight is not None:
            weight = torch.cat([part.dequantize() for part in layer.qweight])
            layer.weight.data = weight.to(layer.weight.device, layer.weight.dtype)
            layer.qweight = None
        if self.can_pack(layer.weight):
            weight = layer.weight.detach()
            layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(
                weight.float() if self.widens(weight) else weight, PACK_BATCH_HINT
            )

    def keeps_plain_weight(self, layer: Any) -> bool:
        """Whether a step reads the row-major weight besides the packed copy (which otherwise
        replaces it once packed)."""
        return False

    def apply(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        if layer.int8_weight is not None and x.shape[0] <= self.int8_max_rows:
            out = self.int8_matmul(x.to(layer.weight.dtype), layer.int8_weight, layer.int8_scales)
            return out if layer.bias is None else out + layer.bias
        if layer.packed_weight is not None:
            packed = layer.packed_weight
            bias = layer.bias
            if bias is not None and bias.dtype != packed.dtype:
                bias = bias.to(packed.dtype)
            out = torch.ops.mkldnn._linear_pointwise(
                x.to(packed.dtype), packed, bias, "none", [], ""
            )
            return out.to(layer.weight.dtype)
        return F.linear(x, layer.weight, layer.bias)

    def int8_matmul(self, x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, w, scales.to(x.dtype))

    def quantized_rows(self, qweight: Any, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of a GGUF table (embedding lookup), decoded to ``dtype``."""
        return qweight.rows_at(ids).dequantize().to(ids.device, dtype)


class NativeLinearBackend(TorchLinearBackend):
    def __init__(self, ops: NativeOps) -> None:
        self.ops = ops
        self.name = ops.isa
        self.amx = ops.amx_supported

    def describe(self) -> str:
        if self.amx:
            return "amx_linear up to 1024 rows, oneDNN above"
        return f"small_linear up to {SMALL_LINEAR_MAX_ROWS} rows, {super().describe()} above"

    def prepare(self, layer: Any) -> None:
        if layer.qweight is not None:
            return  # quant_linear runs the blocks as they are
        super().prepare(layer)
        n, k = layer.weight.shape
        if (
            self.amx
            and layer.weight.dtype == torch.bfloat16
            and layer.bias is None
            and n % 32 == 0
            and k % 32 == 0
        ):
            layer.amx_weight = pack_amx(layer.weight.detach())

    def apply(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        if layer.qweight is not None:
            out = self.quantized_matmul(layer.qweight, x)
            return out if layer.bias is None else out + layer.bias
        rows = x.shape[0] if x.dim() == 2 else -1
        if layer.int8_weight is not None and 0 < rows <= self.int8_max_rows:
            return super().apply(layer, x)
        if layer.amx_weight is not None and 0 < rows <= AMX_LINEAR_MAX_ROWS:
            return self.ops.amx_linear(x.to(torch.bfloat16), layer.amx_weight)
        if 0 < rows <= SMALL_LINEAR_MAX_ROWS and self.streams(layer.weight):
            bias = layer.bias
            if bias is not None and bias.dtype != torch.float32:
                bias = bias.float()
            # (dtypes compared here: a no-op .to() is still a dispatcher call, per layer)
            y = self.ops.small_linear(
                x if x.dtype == torch.float32 else x.float(), layer.weight, bias
            )
            return y if layer.weight.dtype == torch.float32 else y.to(layer.weight.dtype)
        return super().apply(layer, x)

    def keeps_plain_weight(self, layer: Any) -> bool:
        """small_linear reads the plain weight: it stays beside oneDNN's packed copy, which
        prefill steps run (memory: a second copy of each streamed weight, as AMX keeps one in
        its tile layout)."""
        return layer.amx_weight is None and layer.qweight is None and self.streams(layer.weight)

    def streams(self, weight: torch.Tensor) -> bool:
        """Whether small steps run small_linear on this weight: fp32 only. (The kernel also reads
        bf16 weights, widened in registers, but a widened bf16 model's larger steps run oneDNN,
        whose sums round to other bf16 outputs: a sequence decoding alone would then get other
        greedy text than inside a batch, tests/entrypoints/test_bf16_default.py.)"""
        return (
            weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and weight.dim() == 2
            and weight.shape[1] % 16 == 0
            and weight.is_contiguous()
        )

    def int8_matmul(self, x, w, scales):
        if x.shape[1] % 16 or x.shape[0] > INT8_KERNEL_MAX_ROWS:
            return super().int8_matmul(x, w, scales)
        return self.ops.int8_linear(x, w, scales)

    def quantized_matmul(self, qweight: tuple[Any, ...], x: torch.Tensor) -> torch.Tensor:
        """x times the GGUF segments (output rows), concatenated; in x's dtype. bf16 x on a CPU
        without bf16 dot products runs in fp32 (x widened exactly): the kernel's big steps
        decode W to x's dtype for torch's GEMM, which is emulated there in bf16 (16 x 256
        prompt tokens, SmolLM2 Q4_1, Intel Xeon model 207 without AVX512-BF16: 16.0 s in bf16,
        5.0 s widened)."""
        if x.dtype == torch.bfloat16 and not has_native_bf16():
            return quant_matmul(self.ops, qweight, x.float()).to(x.dtype)
        return quant_matmul(self.ops, qweight, x)

    def quantized_rows(self, qweight: Any, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return quant_dequantized(self.ops, qweight.rows_at(ids), dtype)


def quant_matmul(
    ops: NativeOps, qweight: tuple[Any, ...], x: torch.Tensor, batch_invariant: bool = False
) -> torch.Tensor:
    """quant_linear over each segment (the kernel picks its path by the row count, or keeps one
    for every row count with ``batch_invariant``); a segment in act order reads x's columns in
    its order."""
    outs = [
        ops.quant_linear(x, part.data, int(part.qtype), batch_invariant, part.perm)
        for part in qweight
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def quant_dequantized(ops: NativeOps, part: Any, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(part.shape, dtype=dtype)
    ops.quant_dequantize(part.data, int(part.qtype), out)
    return part.in_input_order(out)
