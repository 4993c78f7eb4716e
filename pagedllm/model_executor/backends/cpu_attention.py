"""NativeAttentionBackend: paged attention on one ISA's C++ kernels (ops/csrc).

  * decodes: one call of the decode kernel, reading K/V in place through the block tables;
  * decodes with drafts: the verify (multi-query) kernel, which reads each block once for all
    of a sequence's query tokens; on AMX its bf16 / head_dim 64 products run on tiles;
  * fresh prefills (nothing cached before them), fp32 or bf16: one call of the prefill kernel
    (on the ISA's vector units; on AMX in bf16 with head_dim 64, on tiles);
  * prefills over cached blocks (later chunks, prefix hits), fp32 or bf16 over a cache of
    their dtype (or bf16 under fp32): one call of the paged prefill kernel, which reads every
    key through the block tables (on the vector units on every ISA);
  * the rest (fp16, an int8 cache's prefills) run torch SDPA as in TorchAttentionBackend.

Its limits are the kernels' own, declared here next to the code that calls them.
"""

from __future__ import annotations

import torch

from pagedllm.model_executor.backends.attention_metadata import AttentionMetadata, DecodeMetadata
from pagedllm.model_executor.backends.torch_attention import (
    TorchAttentionBackend,
    window_matters,
    windowed_forward,
)
from pagedllm.model_executor.ops.native import NativeOps

# Head sizes the decode kernel is instantiated for (generic/paged_attention.cpp).
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
# Query rows of one (sequence, kv head) the verify kernel holds (kMaxRows,
# generic/paged_attention_multi.cpp): (drafts + 1) x query heads per kv head.
MAX_VERIFY_ROWS = 64
# dtypes of the prefill kernel (generic/prefill_attention.cpp; head sizes: HEAD_DIMS).
PREFILL_DTYPES = (torch.float32, torch.bfloat16)


class NativeAttentionBackend(TorchAttentionBackend):
    reads_cache_in_place = True
    max_verify_rows = MAX_VERIFY_ROWS

    def __init__(self, ops: NativeOps, dtype: torch.dtype) -> None:
        self.ops = ops
        self.name = ops.isa
        self.prefill_dtype = dtype if dtype in PREFILL_DTYPES else None
        # NOTE: the AVX2 verify kernel runs its 16-lane code as two 8-lane halves: the shared
        # workload in fp32 ran at 197.3 and 204.7 output tok/s with drafts, 255.3 without
        # (AMD EPYC Zen 5 held to AVX2, 2026-12-06), so drafts stay off there unless asked for.
        self.drafts_by_default = ops.isa != "avx2"

    def supports(self, head_dim: int, block_size: int, int8_cache: bool) -> bool:
        if int8_cache and (block_size % 16 or head_dim % 16):
            return False
        return head_dim in HEAD_DIMS

    def can_verify(self, block_size: int, int8_cache: bool) -> bool:
        return not int8_cache and block_size % 16 == 0

    def describe(self) -> str:
        prefill = "the prefill kernels" if self.prefill_dtype else "torch SDPA"
        return f"{self.name} decode/verify kernels, prefills on {prefill}"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, window=None) -> torch.Tensor:
        """Past a sliding window, decodes (with or without drafts) and prefills run the
        kernels' windows."""
        if window is not None and window_matters(meta, window):

            def decode_kernel(qd: torch.Tensor, d: DecodeMetadata) -> torch.Tensor:
                return self.decode(qd, k_cache, v_cache, d, scale, window)

            def fresh_kernel(out: torch.Tensor) -> bool:
                return self.prefill_fresh(q, k, v, meta, out, scale, window)

            def cached_kernel(out: torch.Tensor) -> bool:
                return self.prefill_cached(q, k_cache, v_cache, meta, out, scale, window)

            return windowed_forward(
                q,
                k,
                v,
                k_cache,
                v_cache,
                meta,
                scale,
                window,
                decode_kernel,
                fresh_kernel,
                cached_kernel,
            )
        return super().forward(q, k, v, k_cache, v_cache, meta, scale, window)

    def write_kv(self, k_cache, v_cache, k, v, slots) -> None:
        k, v = k[: slots.shape[0]], v[: slots.shape[0]]
        quantized = k_cache.dtype == torch.int8
        mixed = k.dtype == torch.float32 and k_cache.dtype == torch.bfloat16
        if quantized or mixed or k.dtype == k_cache.dtype:
            self.ops.reshape_and_cache(k, v, k_cache, v_cache, slots)
            return
        super().write_kv(k_cache, v_cache, k, v, slots)

    def prefill_fresh(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor,
        scale: float,
        window: int | None = None,
    ) -> bool:
        if self.prefill_dtype is None or not q.dtype == k.dtype == self.prefill_dtype:
            return False
        assert meta.fresh_prefills is not None
        starts, lens = meta.fresh_prefills
        self.ops.prefill_attention(q, k, v, starts, lens, out, scale, window or 0)
        return True

    def prefill_cached(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor,
        scale: float,
        window: int | None = None,
    ) -> bool:
        if self.prefill_dtype is None or q.dtype != self.prefill_dtype:
            return False
        if k_cache.dtype not in (q.dtype, torch.bfloat16):  # int8
            return False
        c = meta.cached_prefills
        assert c is not None
        self.ops.prefill_attention_paged(
            q,
            k_cache,
            v_cache,
            c.block_tables,
            c.token_starts,
            c.num_tokens,
            c.start_pos,
            out,
            scale,
            window or 0,
        )
        return True

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        d: DecodeMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        window = window or 0
        if d.query_start_loc is None:
            return self.ops.paged_attention_decode(
                q, k_cache, v_cache, d.block_tables, d.seq_lens, scale, d.max_seq_len, window
            )
        # Sequences without drafts on the decode kernel: the verify kernel pads each
        # sequence's rows to its 8-row score tiles, ~2.7x the work for one query x 3 heads.
        s = d.num_single
        multi = self.ops.paged_attention_multi(
            q[s:],
            k_cache,
            v_cache,
            d.block_tables[s:],
            d.seq_lens[s:],
            d.query_start_loc[s:] - s,
            scale,
            d.max_seq_len,
            d.max_query_len,
            window,
        )
        if s == 0:
            return multi
        single = self.ops.paged_attention_decode(
            q[:s],
            k_cache,
            v_cache,
            d.block_tables[:s],
            d.seq_lens[:s],
            scale,
            d.max_seq_len,
            window,
        )
        return torch.cat([single, multi])
