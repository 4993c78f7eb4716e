"""The prefill kernel (ops/csrc/generic/prefill_attention.cpp; in bf16 with head_dim 64 on an AMX
CPU, x86/amx/amx_prefill_attention.cpp) == causal attention in fp32, to fp32 or bf16 accuracy,
for ragged sequences at any offset of the batch, GQA, head sizes around its register tiles, and
views of a fused QKV projection; rows outside the listed sequences are left alone. It runs for
every ISA this CPU executes (the ``ops`` fixture), and every backend's prefill path (the kernel,
or SDPA) is checked on a mixed fresh + cached batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.model_executor.backends.attention_metadata import AttentionMetadata, PrefillSeq
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
    """A batch with a fresh prefill (the kernel on a native backend, else SDPA) and one whose
    first 16 tokens are cached (SDPA over the gathered blocks) gives both sequences their
    attention over all their keys."""
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
        prefills=[PrefillSeq(0, 40, 0, None, None), PrefillSeq(40, 24, 16, table, mask)],
        fresh_prefills=(torch.tensor([0]), torch.tensor([40])),
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
