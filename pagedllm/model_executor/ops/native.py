"""NativeOps: the one Python wrapper per C++ op of one ISA's library (torch.ops.pagedllm_<isa>).

Layers and tests reach the kernels only through here (by way of a backend), so an op's name,
argument order and the contiguity it needs are written down once.
"""

from __future__ import annotations

import functools

import torch

from pagedllm.model_executor.ops.loader import load_library, namespace


class NativeOps:
    def __init__(self, isa: str) -> None:
        self.isa = isa
        self._ops = getattr(torch.ops, namespace(isa))

    # ---- attention ----------------------------------------------------------------------------
    def paged_attention_decode(
        self,
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        scale: float,
        max_seq_len: int,
        window: int = 0,
    ) -> torch.Tensor:
        """``window`` > 0: each sequence attends only its last ``window`` keys."""
        return self._ops.paged_attention_decode(
            q.contiguous(), k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len, window
        )

    def paged_attention_multi(
        self,
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale: float,
        max_seq_len: int,
        max_query_len: int,
        window: int = 0,
    ) -> torch.Tensor:
        """``window`` > 0: each query row attends only its last ``window`` keys."""
        return self._ops.paged_attention_multi(
            q.contiguous(),
            k_cache,
            v_cache,
            block_tables,
            seq_lens,
            query_start_loc,
            scale,
            max_seq_len,
            max_query_len,
            window,
        )

    def prefill_attention(self, q, k, v, starts, lens, out, scale: float, window: int = 0) -> None:
        """``window`` > 0: each row attends only its last ``window`` keys (itself included)."""
        self._ops.prefill_attention(q, k, v, starts, lens, out, scale, window)

    def prefill_attention_paged(
        self,
        q,
        k_cache,
        v_cache,
        block_tables,
        starts,
        lens,
        ctx_lens,
        out,
        scale: float,
        window: int = 0,
    ) -> None:
        """Chunks after ``ctx_lens`` cached tokens, every key read from the paged cache."""
        self._ops.prefill_attention_paged(
            q, k_cache, v_cache, block_tables, starts, lens, ctx_lens, out, scale, window
        )

    def reshape_and_cache(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        self._ops.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)

    # ---- norms, RoPE, activation --------------------------------------------------------------
    def rms_norm(self, x, weight, eps: float, out) -> None:
        self._ops.rms_norm(x, weight, eps, out)

    def fused_add_rms_norm(self, residual, delta, weight, eps: float, out) -> None:
        self._ops.fused_add_rms_norm(residual, delta, weight, eps, out)

    def rotary_embedding(self, positions, q, k, cos, sin) -> None:
        self._ops.rotary_embedding(positions, q, k, cos, sin)

    def silu_and_mul(self, x) -> torch.Tensor:
        return self._ops.silu_and_mul(x)

    # ---- linear -------------------------------------------------------------------------------
    def small_linear(self, x, w, bias=None) -> torch.Tensor:
        """fp32 x [M, K] (M <= 64) times the row-major fp32 or bf16 weight [N, K] -> fp32."""
        return self._ops.small_linear(x.contiguous(), w, bias)

    def int8_linear(self, x, w, scales) -> torch.Tensor:
        return self._ops.int8_linear(x, w, scales)

    def amx_linear(self, x, wp) -> torch.Tensor:
        return self._ops.amx_linear(x if x.stride(1) == 1 else x.contiguous(), wp)

    def bi_linear(self, x, wp, bias, n: int) -> torch.Tensor:
        return self._ops.bi_linear(x.contiguous(), wp, bias, n)

    def quant_linear(
        self, x, w, qtype: int, batch_invariant: bool = False, perm=None
    ) -> torch.Tensor:
        """x [M, K] times the quantized rows w (uint8 [N, row_bytes] of blocks of ``qtype``: a
        GGML type or an AffineType, layers/quant_tensor.py)^T; ``batch_invariant``: one kernel
        for every row count (--deterministic); ``perm``: the blocks hold x's columns in this
        order (GPTQ act order)."""
        return self._ops.quant_linear(x, w, qtype, batch_invariant, perm)

    def quant_dequantize(self, w, qtype: int, out) -> None:
        """Decode the quantized rows w into ``out`` [N, K] (fp32, bf16 or fp16)."""
        self._ops.quant_dequantize(w, qtype, out)

    @functools.cached_property
    def bi_linear_panel(self) -> int:
        """Output columns per weight panel of bi_linear (four of the ISA's registers)."""
        return int(self._ops.bi_linear_panel())

    # ---- sampling -----------------------------------------------------------------------------
    def argmax_rows(self, x) -> torch.Tensor:
        return self._ops.argmax_rows(x)

    def argmax_gap_rows(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        return self._ops.argmax_gap_rows(x)

    def apply_token_bitmask(self, logits, rows, bitmask) -> None:
        self._ops.apply_token_bitmask(logits, rows, bitmask)

    # ---- multi-LoRA ---------------------------------------------------------------------------
    def lora_apply(self, y, x, slots, a, bt, bounds: list[int]) -> None:
        self._ops.lora_apply(y, x, slots, a, bt, bounds)

    @property
    def bf16_pairs(self) -> bool:
        """Built with AVX512-BF16: kernels take bf16 weights as VNNI pairs (vdpbf16ps)."""
        return self.isa in ("avx512bf16", "amx")

    @functools.cached_property
    def amx_supported(self) -> bool:
        """Built with the AMX kernels, and Linux granted this process the tile state."""
        return bool(self._ops.amx_supported())


@functools.cache
def native_ops(isa: str) -> NativeOps | None:
    """The ISA's ops, or None where its library is not built or this CPU cannot run it."""
    return NativeOps(isa) if load_library(isa) else None
