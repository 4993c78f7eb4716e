"""--deterministic: a native backend whose results for one token do not depend on the batch.

A request's greedy output then stays the same whatever runs beside it, where it sits in the
batch, whether its prompt came from the prefix cache or in chunks, in bf16 as in fp32. Two
kernels of the normal backend sum in an order that depends on the batch:

  * oneDNN's GEMM picks its k-blocking by the row count (bf16, 1536-wide down projection: 6 of
    64 rows differ from the same rows run alone; fp32: all 64), so every matmul here runs
    bi_linear (generic/batch_invariant_linear.cpp), which sums each output over k in one order;
  * attention of prefills (the prefill kernel, SDPA over cached blocks) and of drafts (the
    verify kernel) tiles the query rows, so every query row here runs the decode kernel, which
    attends one row to its own context (``AttentionMetadata.token_rows``; its last ``window``
    keys in a sliding-window layer) in a fixed order.

The rest already works row by row (norms, RoPE, activation, argmax, LoRA's per-token tiles).
The cost is measured in docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pagedllm.model_executor.backends.attention_metadata import AttentionMetadata
from pagedllm.model_executor.backends.base import Backend
from pagedllm.model_executor.backends.cpu_attention import NativeAttentionBackend
from pagedllm.model_executor.backends.kernels import NativeKernels
from pagedllm.model_executor.backends.linear import (
    TorchLinearBackend,
    quant_dequantized,
    quant_matmul,
)
from pagedllm.model_executor.ops.native import NativeOps


class BatchInvariantLinearBackend(TorchLinearBackend):
    # bi_linear builds nothing per row count: no need to pad the rows to buckets.
    pads_rows = False
    int8_max_rows = 0

    def __init__(self, ops: NativeOps) -> None:
        self.ops = ops
        self.name = ops.isa

    def describe(self) -> str:
        return "bi_linear (one summation order per output, any batch)"

    def can_pack(self, weight: torch.Tensor) -> bool:
        return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)

    def prepare(self, layer: Any) -> None:
        if layer.qweight is not None:
            return  # quant_linear: one summation order per output already
        w = layer.weight.detach()
        if not self.can_pack(w):
            raise ValueError(
                f"--deterministic runs fp32 or bf16 weights on CPU; a Linear has {w.dtype} on "
                f"{w.device.type}"
            )
        layer.packed_weight = self.pack(w)

    def quantized_rows(self, qweight: Any, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return quant_dequantized(self.ops, qweight.rows_at(ids), dtype)

    def pack(self, w: torch.Tensor) -> torch.Tensor:
        """[n, k] -> bi_linear's panels: [n/P, k, P], or VNNI pairs [n/P, k/2, P, 2] for bf16
        where the ISA has the bf16 dot product (n zero-padded to a multiple of P)."""
        p = self.ops.bi_linear_panel
        n, k = w.shape
        w = F.pad(w, (0, 0, 0, -n % p))
        if w.dtype == torch.bfloat16 and self.ops.bf16_pairs and k % 2 == 0:
            return w.view(-1, p, k // 2, 2).permute(0, 2, 1, 3).contiguous()
        return w.view(-1, p, k).permute(0, 2, 1).contiguous()

    def apply(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        if layer.qweight is not None:
            y = quant_matmul(self.ops, layer.qweight, x, batch_invariant=True)
            return y if layer.bias is None else y + layer.bias
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).to(layer.packed_weight.dtype)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        y = self.ops.bi_linear(x, layer.packed_weight, bias, layer.out_features)
        return y.view(*lead, y.shape[-1])


class BatchInvariantAttentionBackend(NativeAttentionBackend):
    """Every query row on the decode kernel, against its own context read in place."""

    per_token_rows = True

    def describe(self) -> str:
        return f"{self.name} decode kernel for every query row (batch-invariant)"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        rows = meta.token_rows
        assert rows is not None, "input_batch builds token_rows for this backend"
        n = rows.num_tokens
        res = self.ops.paged_attention_decode(
            q[:n],
            k_cache,
            v_cache,
            rows.block_tables,
            rows.seq_lens,
            scale,
            rows.max_seq_len,
            window or 0,
        )
        if n == q.shape[0]:
            return res
        out = q.new_zeros(q.shape)  # pad rows
        out[:n] = res
        return out


def batch_invariant(backend: Backend, dtype: torch.dtype) -> Backend:
    """``backend``'s ISA with the batch-invariant linear and attention (its norms, RoPE,
    activation and argmax already are)."""
    if not isinstance(backend.kernels, NativeKernels):
        raise ValueError(
            "--deterministic runs on the native CPU kernels (amx, avx512bf16, avx512, avx2); "
            "this engine "
            f"would run on {backend.name} (a CUDA device, PAGEDLLM_CPU_ISA=torch, or kernels "
            "not built)"
        )
    ops = backend.kernels.ops
    return Backend(
        f"{backend.name}+deterministic",
        BatchInvariantAttentionBackend(ops, dtype),
        BatchInvariantLinearBackend(ops),
        backend.kernels,
    )
