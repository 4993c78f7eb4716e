"""Paged attention in plain torch: write the step's K/V into their cache slots, then attend
through the block tables.

KV cache of one layer (K and V each):

    [num_blocks, block_size, num_kv_heads, head_dim]
     slot s = block_id * block_size + offset   (slot_mapping holds one slot per new token)

The batch is split in two groups, each one SDPA call:
  * decode group (one query token per sequence): gather each sequence's blocks, mask by length;
  * prefill group (several query tokens): pad queries per sequence, causal mask by position.
Tokens arrive ordered decode group first (the model runner sorts them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """One SDPA call's worth of sequences."""

    num_tokens: int
    block_tables: torch.Tensor  # [B, max_blocks] int64
    key_mask: torch.Tensor  # [B, 1, Q, L] bool: may query q attend key l
    pad_valid: torch.Tensor | None  # [B*Q] bool: real (non-padding) query slots
    max_query_len: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    decode: AttentionGroup | None
    prefill: AttentionGroup | None


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, H, D] gathered by [B, nb] -> [B, H, nb*bs, D]."""
    b, nb = block_tables.shape
    _, bs, h, d = cache.shape
    return cache[block_tables].view(b, nb * bs, h, d).transpose(1, 2)


def _attend(q: torch.Tensor, k_cache, v_cache, group: AttentionGroup, scale: float):
    """q: [B, Hq, Q, D] -> [B, Hq, Q, D]."""
    k = _gather(k_cache, group.block_tables).to(q.dtype)
    v = _gather(v_cache, group.block_tables).to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=group.key_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D] (K/V of these tokens already written) -> [T, Hq, D]."""
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    start = 0
    if meta.decode is not None:
        g = meta.decode
        qd = q[: g.num_tokens].unsqueeze(2)  # [B, Hq, 1, D]
        out[: g.num_tokens] = _attend(qd, k_cache, v_cache, g, scale).squeeze(2)
        start = g.num_tokens
    if meta.prefill is not None:
        g = meta.prefill
        qp = q[start : start + g.num_tokens]
        batch = g.block_tables.shape[0]
        padded = qp.new_zeros(batch * g.max_query_len, num_heads, head_dim)
        padded[g.pad_valid] = qp
        padded = padded.view(batch, g.max_query_len, num_heads, head_dim).transpose(1, 2)
        res = _attend(padded, k_cache, v_cache, g, scale)
        res = res.transpose(1, 2).reshape(batch * g.max_query_len, num_heads, head_dim)
        out[start : start + g.num_tokens] = res[g.pad_valid]
    return out
