"""Paged attention: write the step's K/V into their cache slots, then attend through the block
tables.

KV cache of one layer (K and V each):

    [num_blocks, block_size, num_kv_heads, head_dim]
     slot s = block_id * block_size + offset   (slot_mapping holds one slot per new token)

Tokens arrive ordered decode requests first (one query each), then prefills (the model runner
sorts them):
  * decodes: one call of the native kernel, which reads K/V in place through the block tables
    (fallback: gather each sequence's blocks and run one masked SDPA);
  * prefills: one SDPA per sequence on its fresh K/V, or, when part of its context is already
    cached (chunked prefill, prefix hit), on its gathered blocks with a bottom-right causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedllm.model_executor.ops import native_ops_available


@dataclass
class DecodeMetadata:
    num_tokens: int
    block_tables: torch.Tensor  # [B, max_blocks] int64
    seq_lens: torch.Tensor  # [B] int64
    max_seq_len: int
    key_mask: torch.Tensor | None  # [B, 1, 1, L] bool, for the torch fallback only


@dataclass
class PrefillSeq:
    token_start: int  # offset of this sequence's tokens in the batch
    num_tokens: int
    start_pos: int  # tokens already in the cache before this step
    block_table: torch.Tensor | None  # [num_blocks] int64, when start_pos > 0
    key_mask: torch.Tensor | None  # [Q, L] bool, when start_pos > 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    decode: DecodeMetadata | None
    prefills: list[PrefillSeq]


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


NATIVE_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)


def use_native_decode(device: torch.device, head_dim: int) -> bool:
    return device.type == "cpu" and head_dim in NATIVE_HEAD_DIMS and native_ops_available()


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (already written to the cache) -> [T, Hq, D]."""
    out = torch.empty_like(q)
    if meta.decode is not None:
        d = meta.decode
        out[: d.num_tokens] = _decode(q[: d.num_tokens], k_cache, v_cache, d, scale)
    gqa = q.shape[1] != k.shape[1]
    for s in meta.prefills:
        rows = slice(s.token_start, s.token_start + s.num_tokens)
        qs = q[rows].transpose(0, 1)  # [Hq, Q, D]
        if s.block_table is None:
            ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            res = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa
            )
        else:
            ks = _gather_seq(k_cache, s.block_table).to(q.dtype)
            vs = _gather_seq(v_cache, s.block_table).to(q.dtype)
            res = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=s.key_mask, scale=scale, enable_gqa=gqa
            )
        out[rows] = res.transpose(0, 1)
    return out


def _decode(q, k_cache, v_cache, d: DecodeMetadata, scale: float) -> torch.Tensor:
    if d.key_mask is None:
        return torch.ops.pagedllm.paged_attention_decode(
            q.contiguous(), k_cache, v_cache, d.block_tables, d.seq_lens, scale, d.max_seq_len
        )
    # Fallback: gather every sequence's blocks, mask by length, one SDPA.
    b, nb = d.block_tables.shape
    _, bs, h, dim = k_cache.shape
    ks = k_cache[d.block_tables].view(b, nb * bs, h, dim).transpose(1, 2).to(q.dtype)
    vs = v_cache[d.block_tables].view(b, nb * bs, h, dim).transpose(1, 2).to(q.dtype)
    res = F.scaled_dot_product_attention(
        q.unsqueeze(2), ks, vs, attn_mask=d.key_mask, scale=scale, enable_gqa=h != q.shape[1]
    )
    return res.squeeze(2)


def _gather_seq(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, H, D] gathered by [nb] -> [H, nb*bs, D]."""
    _, bs, h, d = cache.shape
    return cache[block_table].view(-1, h, d).transpose(0, 1)
