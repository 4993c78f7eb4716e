"""Paged attention: write the step's K/V into their cache slots, then attend through the block
tables.

KV cache of one layer:

    K: [num_blocks, num_kv_heads, head_dim, block_size]   (transposed per block: the decode
    V: [num_blocks, num_kv_heads, block_size, head_dim]    kernel scores a block with vector FMAs)
     slot s = block_id * block_size + offset   (slot_mapping holds one slot per new token)

With ``kv_cache_dtype="bfloat16"`` under an fp32 model the cache is bf16 (rounded to nearest
even on write) while q, the scores and the outputs stay fp32.

With ``kv_cache_dtype="int8"`` each (block, kv head) is one int8 record of
``block_size * (head_dim + 4)`` bytes: the values in the layout above, then one fp32 scale per
token (symmetric, max|x| / 127 over the head's head_dim values). ``int8_views`` splits a record.

Tokens arrive ordered decode requests first (one query each, or with draft tokens a few), then
prefills (the model runner sorts them):
  * decodes: one call of the native kernel, which reads K/V in place through the block tables
    (fallback: gather each sequence's blocks and run one masked SDPA); with drafts, the
    multi-query kernel, which reads each block once for all of a sequence's query tokens;
  * prefills: in bf16 with head_dim 64 on a CPU with AMX, the fresh ones (nothing cached) in one
    call of the native AMX kernel; otherwise one SDPA per sequence on its fresh K/V, or, when
    part of its context is already cached (chunked prefill, prefix hit), on its gathered blocks
    with a bottom-right causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedllm.model_executor.ops import amx_available, native_ops_available, use_native


@dataclass
class DecodeMetadata:
    num_tokens: int
    block_tables: torch.Tensor  # [B, max_blocks] int64
    seq_lens: torch.Tensor  # [B] int64
    max_seq_len: int
    key_mask: torch.Tensor | None  # [B, 1, 1, L] bool, for the torch fallback only
    # With draft tokens: [B + 1] offsets of each sequence's query rows (its newest token and
    # drafts, the last positions of its seq_len), for the native multi-query kernel.
    query_start_loc: torch.Tensor | None = None
    max_query_len: int = 1


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
    # The prefills with nothing cached (start_pos == 0) as (token_start, num_tokens) int64
    # tensors, for the native AMX kernel (ops/csrc/prefill_attention.cpp).
    fresh_prefills: tuple[torch.Tensor, torch.Tensor] | None = None


def int8_views(
    cache: torch.Tensor, head_dim: int, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 cache [NB, H, BS * (D + 4)] -> (values [NB, H, D, BS] if ``transposed`` (K) else
    [NB, H, BS, D] (V), scales [NB, H, BS] fp32), both views of the cache."""
    nb, h, rec = cache.shape
    bs = rec // (head_dim + 4)
    shape = (nb, h, head_dim, bs) if transposed else (nb, h, bs, head_dim)
    return cache[..., : bs * head_dim].view(shape), cache[..., bs * head_dim :].view(torch.float32)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: x ~ q * scale[..., None]."""
    amax = x.float().abs().amax(dim=-1)
    scale = amax / 127
    # A true division, as the native kernel does (``127 / tensor`` multiplies by a reciprocal).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return torch.round(x.float() * inv[..., None]).to(torch.int8), scale


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Write the K/V rows of ``slots``; rows past them (pad rows, see input_batch) write nothing."""
    k, v = k[: slots.shape[0]], v[: slots.shape[0]]
    quantized = k_cache.dtype == torch.int8
    mixed = k.dtype == torch.float32 and k_cache.dtype == torch.bfloat16
    if use_native(k) and (quantized or mixed or k.dtype == k_cache.dtype):
        torch.ops.pagedllm.reshape_and_cache(k, v, k_cache, v_cache, slots)
        return
    if quantized:
        (kq, ks), (vq, vs) = quantize_int8(k), quantize_int8(v)
        kvals, kscales = int8_views(k_cache, k.shape[-1], transposed=True)
        vvals, vscales = int8_views(v_cache, v.shape[-1], transposed=False)
        block_size = vvals.shape[2]
        blocks, offsets = slots // block_size, slots % block_size
        kvals.permute(0, 3, 1, 2)[blocks, offsets] = kq
        vvals.permute(0, 2, 1, 3)[blocks, offsets] = vq
        kscales.permute(0, 2, 1)[blocks, offsets] = ks
        vscales.permute(0, 2, 1)[blocks, offsets] = vs
        return
    block_size = v_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    # Both views index as [block, offset, head, dim]; the writes land in the cache tensors.
    k_cache.permute(0, 3, 1, 2)[blocks, offsets] = k.to(k_cache.dtype)
    v_cache.permute(0, 2, 1, 3)[blocks, offsets] = v.to(v_cache.dtype)


NATIVE_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)


def use_native_decode(
    device: torch.device, head_dim: int, block_size: int = 16, int8_cache: bool = False
) -> bool:
    if int8_cache and (block_size % 16 or head_dim % 16):
        return False
    return device.type == "cpu" and head_dim in NATIVE_HEAD_DIMS and native_ops_available()


def use_native_multi_query(block_size: int, int8_cache: bool) -> bool:
    """Whether decodes with drafts can take the native multi-query kernel (after
    use_native_decode); else they run as prefill chunks over gathered blocks."""
    return not int8_cache and block_size % 16 == 0


def use_amx_prefill(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and k.dtype == torch.bfloat16
        and q.shape[-1] == 64
        and amx_available()
    )


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
    out[meta.slot_mapping.shape[0] :] = 0  # pad rows, if any
    if meta.decode is not None:
        d = meta.decode
        out[: d.num_tokens] = _decode(q[: d.num_tokens], k_cache, v_cache, d, scale)
    gqa = q.shape[1] != k.shape[1]
    prefills = meta.prefills
    if meta.fresh_prefills is not None and use_amx_prefill(q, k):
        starts, lens = meta.fresh_prefills
        torch.ops.pagedllm.prefill_attention(q, k, v, starts, lens, out, scale)
        prefills = [s for s in prefills if s.block_table is not None]
    for s in prefills:
        rows = slice(s.token_start, s.token_start + s.num_tokens)
        # NOTE: 4-D inputs: torch's CPU flash-attention kernel takes them (3-D ones fall back to
        # the unfused math path, ~10x slower).
        qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, Q, D]
        if s.block_table is None:
            ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            mask, causal = None, True
        else:
            ks, vs = gather_kv(k_cache, v_cache, s.block_table, q.shape[-1], q.dtype)
            mask, causal = s.key_mask, False
        res = F.scaled_dot_product_attention(
            qs,
            ks.unsqueeze(0),
            vs.unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=gqa,
        )
        out[rows] = res[0].transpose(0, 1)
    return out


def _decode(q, k_cache, v_cache, d: DecodeMetadata, scale: float) -> torch.Tensor:
    if d.query_start_loc is not None:
        return torch.ops.pagedllm.paged_attention_multi(
            q.contiguous(),
            k_cache,
            v_cache,
            d.block_tables,
            d.seq_lens,
            d.query_start_loc,
            scale,
            d.max_seq_len,
            d.max_query_len,
        )
    if d.key_mask is None:
        return torch.ops.pagedllm.paged_attention_decode(
            q.contiguous(), k_cache, v_cache, d.block_tables, d.seq_lens, scale, d.max_seq_len
        )
    # Fallback: gather every sequence's blocks, mask by length, one SDPA.
    b, nb = d.block_tables.shape
    ks, vs = gather_kv(k_cache, v_cache, d.block_tables.flatten(), q.shape[-1], q.dtype)
    h, dim = ks.shape[0], ks.shape[-1]
    ks = ks.view(h, b, -1, dim).transpose(0, 1)
    vs = vs.view(h, b, -1, dim).transpose(0, 1)
    res = F.scaled_dot_product_attention(
        q.unsqueeze(2),
        ks,
        vs,
        attn_mask=d.key_mask,
        scale=scale,
        enable_gqa=h != q.shape[1],
    )
    return res.squeeze(2)


def gather_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    head_dim: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The listed blocks -> K, V as [num_kv_heads, nb * block_size, head_dim] in ``dtype``
    (an int8 cache is dequantized)."""
    if k_cache.dtype == torch.int8:
        kvals, kscales = int8_views(k_cache, head_dim, transposed=True)
        vvals, vscales = int8_views(v_cache, head_dim, transposed=False)
        k = kvals[block_table].float() * kscales[block_table][:, :, None, :]
        v = vvals[block_table].float() * vscales[block_table][..., None]
    else:
        k, v = k_cache[block_table], v_cache[block_table]
    h = k.shape[1]
    k = k.permute(1, 0, 3, 2).reshape(h, -1, head_dim)
    v = v.transpose(0, 1).reshape(h, -1, head_dim)
    return k.to(dtype), v.to(dtype)
