"""The prefill kernel (ops/csrc/generic/prefill_attention.cpp; in bf16 with head_dim 64 on an AMX
CPU, x86/amx/amx_prefill_attention.cpp) == causal attention in fp32, to fp32 or bf16 accuracy,
for ragged sequences at any offset of the batch, GQA, head sizes around its register tiles, and
views of a fused QKV projection; rows outside the listed sequences are left alone. The paged
prefill kernel (chunks after cached tokens, keys read through block tables) likewise, for
contexts around its blocks and tiles, scattered blocks, block sizes 16 and 5, a bf16 cache
under fp32, and windows. Both run for every ISA this CPU executes (the ``ops`` fixture), and
every backend's prefill path (the kernels, or SDPA) is checked on a mixed fresh + cached
batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.model_executor.backends.attention_metadata import (
    AttentionMetadata,
    CachedPrefills,
    PrefillSeq,
)
from tests.utils import backend_names, get_backend

D = 64


def fused_qkv(tokens, heads, kv_heads, seed=0, dtype=torch.bfloat16, dim=D):
    """q, k, v as the model has them: views of one [T, (H + 2 Hkv) * D] projection."""
    torch.manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return (
        q.view(tokens, heads, dim),
        k.view(tokens, kv_heads, dim),
        v.view(tokens, kv_heads, dim),
    )


def causal_fp32(q, k, v, scale, window=0):
    """[L, H, D] -> [L, H, D], in fp32; ``window``: each row sees its last that many keys."""
    n = q.shape[0]
    mask = None
    if window:
        i = torch.arange(n)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    res = F.scaled_dot_product_attention(
        q.float().transpose(0, 1),
        k.float().transpose(0, 1),
        v.float().transpose(0, 1),
        attn_mask=mask,
        is_causal=not window,
        scale=scale,
        enable_gqa=True,
    )
    return res.transpose(0, 1)


@pytest.mark.parametrize(
    "dtype,heads,kv_heads,dim",
    [
        (torch.bfloat16, 9, 3, 64),
        (torch.bfloat16, 4, 4, 64),
        (torch.bfloat16, 8, 1, 64),
        (torch.float32, 9, 3, 64),
        (torch.float32, 8, 1, 64),
        (torch.float32, 2, 1, 80),  # 80 dims: a partial value tile
        (torch.bfloat16, 2, 2, 128),
        (torch.float32, 2, 1, 16),
    ],
)
def test_matches_fp32_attention_for_ragged_sequences(ops, dtype, heads, kv_heads, dim):
    # lengths around the 16-row tasks, the 8/16-key blocks and the 4-block score tiles; a gap
    # of 5 rows between sequences
    lens = [1, 7, 15, 16, 17, 31, 32, 33, 63, 65, 100, 257]
    starts, pos = [], 3
    for n in lens:
        starts.append(pos)
        pos += n + 5
    q, k, v = fused_qkv(pos, heads, kv_heads, dtype=dtype, dim=dim)
    scale = dim**-0.5
    out = torch.full((pos, heads, dim), 7.0, dtype=dtype)
    ops.prefill_attention(q, k, v, torch.tensor(starts), torch.tensor(lens), out, scale)
    covered = torch.zeros(pos, dtype=torch.bool)
    for s, n in zip(starts, lens):
        rows = slice(s, s + n)
        covered[rows] = True
        want = causal_fp32(q[rows], k[rows], v[rows], scale)
        err = (out[rows].float() - want).abs().max().item()
        if dtype == torch.float32:
            assert err < 1e-4, (n, err)
            continue
        # bf16 SDPA's own error against fp32, as the yardstick
        sdpa = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),
            k[rows].transpose(0, 1).unsqueeze(0),
            v[rows].transpose(0, 1).unsqueeze(0),
            is_causal=True,
            scale=scale,
            enable_gqa=heads != kv_heads,
        )[0].transpose(0, 1)
        sdpa_err = (sdpa.float() - want).abs().max().item()
        assert err <= max(2 * sdpa_err, 1e-2), (n, err, sdpa_err)
    assert (out[~covered] == 7.0).all(), "rows outside the sequences were written"


@pytest.mark.parametrize("window", [1, 5, 16, 17, 40, 300])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_sliding_window_matches_fp32_attention(ops, window, dtype, tol):
    """Row i sees keys i - window + 1 .. i: windows inside and across the 16-key blocks and the
    16-row tasks, longer than some sequences or all of them."""
    lens = [1, 15, 17, 33, 100, 257]
    starts, pos = [], 2
    for n in lens:
        starts.append(pos)
        pos += n + 3
    q, k, v = fused_qkv(pos, 9, 3, dtype=dtype)
    scale = D**-0.5
    out = torch.zeros(pos, 9, D, dtype=dtype)
    ops.prefill_attention(q, k, v, torch.tensor(starts), torch.tensor(lens), out, scale, window)
    for s, n in zip(starts, lens):
        rows = slice(s, s + n)
        want = causal_fp32(q[rows], k[rows], v[rows], scale, window)
        err = (out[rows].float() - want).abs().max().item()
        assert err < tol, (n, err)
        if n >= window + 16:  # and it is not attention over everything
            full = causal_fp32(q[rows], k[rows], v[rows], scale)
            assert (out[rows].float() - full).abs().max() > 2 * tol


@pytest.mark.parametrize("backend", backend_names())
def test_fresh_and_cached_prefills_in_one_batch(backend):
    """A batch with a fresh prefill and one whose first 16 tokens are cached (the prefill and
    paged prefill kernels on a native backend, else SDPA, over the gathered blocks for the
    second) gives both sequences their attention over all their keys."""
    heads, kv_heads, bs = 9, 3, 16
    q, k, v = fused_qkv(40 + 24, heads, kv_heads, seed=1)
    # sequence B: 16 cached tokens (block 2) + 24 new ones (blocks 3, 4)
    k_prev, v_prev = fused_qkv(16, heads, kv_heads, seed=2)[1:]
    num_blocks = 8
    k_cache = torch.zeros(num_blocks, kv_heads, D, bs, dtype=torch.bfloat16)
    v_cache = torch.zeros(num_blocks, kv_heads, bs, D, dtype=torch.bfloat16)
    all_k = torch.cat([k_prev, k[40:]])
    all_v = torch.cat([v_prev, v[40:]])
    for i in range(40):
        blk, off = 2 + i // bs, i % bs
        k_cache[blk, :, :, off] = all_k[i]
        v_cache[blk, :, off, :] = all_v[i]
    table = torch.tensor([2, 3, 4])
    q_pos = 16 + torch.arange(24)
    mask = torch.arange(3 * bs)[None, :] <= q_pos[:, None]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(64, dtype=torch.long),
        decode=None,
        prefills=[PrefillSeq(0, 40, 0, None), PrefillSeq(40, 24, 16, table)],
        fresh_prefills=(torch.tensor([0]), torch.tensor([40])),
        cached_prefills=CachedPrefills(
            torch.tensor([40]), torch.tensor([24]), torch.tensor([16]), table[None]
        ),
    )
    attention = get_backend(backend, torch.bfloat16).attention
    out = attention.forward(q, k, v, k_cache, v_cache, meta, D**-0.5)
    want_a = causal_fp32(q[:40], k[:40], v[:40], D**-0.5)
    torch.testing.assert_close(out[:40].float(), want_a, atol=2e-2, rtol=0)
    full = F.scaled_dot_product_attention(
        q[40:].float().transpose(0, 1),
        all_k.float().transpose(0, 1),
        all_v.float().transpose(0, 1),
        attn_mask=mask[:, :40],
        scale=D**-0.5,
        enable_gqa=True,
    ).transpose(0, 1)
    torch.testing.assert_close(out[40:].float(), full, atol=2e-2, rtol=0)


def paged_chunks(chunks, heads, kv_heads, dim, block_size, dtype, cache_dtype, seed=0):
    """q rows for ``chunks`` [(cached tokens, new tokens)] from row 2 on, and caches holding
    every chunk's keys in blocks scattered at random; block tables padded with -1."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-(c + n) // block_size) for c, n in chunks]
    num_blocks = sum(blocks) + 7
    perm = torch.randperm(num_blocks, generator=g)
    k_cache = torch.randn(num_blocks, kv_heads, dim, block_size, generator=g).to(cache_dtype)
    v_cache = torch.randn(num_blocks, kv_heads, block_size, dim, generator=g).to(cache_dtype)
    q = torch.randn(2 + sum(n for _, n in chunks) + 3, heads, dim, generator=g).to(dtype)
    tables = torch.full((len(chunks), max(blocks) + 2), -1, dtype=torch.long)
    starts, used, row = [], 0, 2
    for i, (_, n) in enumerate(chunks):
        tables[i, : blocks[i]] = perm[used : used + blocks[i]]
        used += blocks[i]
        starts.append(row)
        row += n
    return q, k_cache, v_cache, tables, starts


def paged_fp32(q_rows, k_cache, v_cache, table, ctx, scale, window=0):
    """Rows at positions ctx.. over the sequence's gathered blocks, in fp32."""
    n, bs = q_rows.shape[0], k_cache.shape[3]
    keys = ctx + n
    nb = -(-keys // bs)
    ks = k_cache[table[:nb]].permute(0, 3, 1, 2).reshape(nb * bs, k_cache.shape[1], -1)[:keys]
    vs = v_cache[table[:nb]].permute(0, 2, 1, 3).reshape(nb * bs, v_cache.shape[1], -1)[:keys]
    qpos, kpos = ctx + torch.arange(n), torch.arange(keys)
    mask = kpos[None, :] <= qpos[:, None]
    if window:
        mask &= kpos[None, :] > qpos[:, None] - window
    res = F.scaled_dot_product_attention(
        q_rows.float().transpose(0, 1),
        ks.float().transpose(0, 1),
        vs.float().transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return res.transpose(0, 1)


PAGED_CHUNKS = [(1, 1), (15, 17), (16, 16), (17, 33), (100, 5), (300, 200), (0, 20), (33, 1)]


@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize(
    "dtype,cache_dtype,tol",
    [
        (torch.float32, torch.float32, 1e-4),
        (torch.bfloat16, torch.bfloat16, 3e-2),
        (torch.float32, torch.bfloat16, 1e-4),  # --kv-cache-dtype bfloat16 under fp32
    ],
)
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (2, 1, 80), (4, 4, 16)])
def test_paged_matches_fp32_attention_over_the_cache(
    ops, block_size, dtype, cache_dtype, tol, heads, kv_heads, dim
):
    q, k_cache, v_cache, tables, starts = paged_chunks(
        PAGED_CHUNKS, heads, kv_heads, dim, block_size, dtype, cache_dtype
    )
    out = torch.full_like(q, 7.0)
    lens = torch.tensor([n for _, n in PAGED_CHUNKS])
    ctx = torch.tensor([c for c, _ in PAGED_CHUNKS])
    scale = dim**-0.5
    ops.prefill_attention_paged(
        q, k_cache, v_cache, tables, torch.tensor(starts), lens, ctx, out, scale
    )
    covered = torch.zeros(q.shape[0], dtype=torch.bool)
    for i, (c, n) in enumerate(PAGED_CHUNKS):
        rows = slice(starts[i], starts[i] + n)
        covered[rows] = True
        want = paged_fp32(q[rows], k_cache, v_cache, tables[i], c, scale)
        err = (out[rows].float() - want).abs().max().item()
        assert err < tol, (c, n, err)
    assert (out[~covered] == 7.0).all(), "rows outside the chunks were written"


@pytest.mark.parametrize("window", [1, 7, 16, 40, 1000])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_paged_sliding_window(ops, window, dtype, tol):
    q, k_cache, v_cache, tables, starts = paged_chunks(PAGED_CHUNKS, 9, 3, D, 16, dtype, dtype)
    out = torch.zeros_like(q)
    lens = torch.tensor([n for _, n in PAGED_CHUNKS])
    ctx = torch.tensor([c for c, _ in PAGED_CHUNKS])
    ops.prefill_attention_paged(
        q, k_cache, v_cache, tables, torch.tensor(starts), lens, ctx, out, D**-0.5, window
    )
    for i, (c, n) in enumerate(PAGED_CHUNKS):
        rows = slice(starts[i], starts[i] + n)
        want = paged_fp32(q[rows], k_cache, v_cache, tables[i], c, D**-0.5, window)
        assert (out[rows].float() - want).abs().max() < tol, (c, n)
        if c + n >= window + 16:  # and it is not attention over everything
            full = paged_fp32(q[rows], k_cache, v_cache, tables[i], c, D**-0.5)
            assert (out[rows].float() - full).abs().max() > 2 * tol


def test_paged_rejects_what_it_cannot_run(ops):
    bf16 = torch.bfloat16
    q, k_cache, v_cache, tables, starts = paged_chunks([(20, 8)], 4, 4, D, 16, bf16, bf16)
    out = torch.empty_like(q)
    lens, ctx = torch.tensor([8]), torch.tensor([20])

    def call(q=q, k_cache=k_cache, v_cache=v_cache, tables=tables, starts=starts):
        ops.prefill_attention_paged(
            q, k_cache, v_cache, tables, torch.tensor(starts), lens, ctx, out, 0.1
        )

    with pytest.raises(RuntimeError, match="the cache holds q's dtype"):
        call(k_cache=k_cache.float(), v_cache=v_cache.float())
    with pytest.raises(RuntimeError, match="block id out of range"):
        call(tables=tables.masked_fill(tables >= 0, 999))
    with pytest.raises(RuntimeError, match="block_tables too short"):
        call(tables=tables[:, :1])
    with pytest.raises(RuntimeError, match="chunk rows out of range"):
        call(starts=[q.shape[0] - 4])


def test_rejects_what_it_cannot_run(ops):
    q, k, v = fused_qkv(8, 4, 4)
    out = torch.empty(8, 4, D, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.prefill_attention(q.float(), k, v, torch.tensor([0]), torch.tensor([8]), out, 0.1)
    with pytest.raises(RuntimeError, match="fp32 or bf16 only"):
        ops.prefill_attention(q.half(), k, v, torch.tensor([0]), torch.tensor([8]), out, 0.1)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.prefill_attention(q, k, v, torch.tensor([4]), torch.tensor([8]), out, 0.1)
    q48, k48, v48 = fused_qkv(8, 2, 2, dim=48)
    out48 = torch.empty(8, 2, 48, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="head_dim 48"):
        ops.prefill_attention(q48, k48, v48, torch.tensor([0]), torch.tensor([8]), out48, 0.1)
