"""Each ISA's multi-query kernel (speculative verification: a few query tokens per sequence on
top of its cached context) == causal attention computed with plain torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def _case(q_dtype, cache_dtype, head_dim, heads, kv_heads, block_size, q_lens, seq_lens):
    torch.manual_seed(0)
    seq_lens = torch.tensor(seq_lens, dtype=torch.long)
    q_lens = torch.tensor(q_lens, dtype=torch.long)
    b = len(seq_lens)
    nb = int(-(-seq_lens.max() // block_size))
    num_blocks = b * nb + 2
    kc = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(cache_dtype)
    vc = torch.randn_like(kc)
    tables = torch.randperm(num_blocks)[: b * nb].view(b, nb).long()
    q = torch.randn(int(q_lens.sum()), heads, head_dim).to(q_dtype)
    starts = torch.zeros(b + 1, dtype=torch.long)
    starts[1:] = q_lens.cumsum(0)
    return q, kc, vc, tables, seq_lens, starts, head_dim**-0.5


def _reference(q, kc, vc, tables, seq_lens, starts, scale, window=0):
    out = torch.zeros(q.shape, dtype=torch.float32)
    for b in range(len(seq_lens)):
        n, rows = int(seq_lens[b]), slice(int(starts[b]), int(starts[b + 1]))
        q_len = rows.stop - rows.start
        k = kc[tables[b]].flatten(0, 1)[:n].transpose(0, 1).float()
        v = vc[tables[b]].flatten(0, 1)[:n].transpose(0, 1).float()
        # Query i is at position n - q_len + i and sees keys up to it.
        pos = (n - q_len + torch.arange(q_len))[:, None]
        mask = torch.arange(n)[None, :] <= pos
        if window:  # and sees only its last ``window`` keys
            mask &= torch.arange(n)[None, :] > pos - window
        qb = q[rows].transpose(0, 1).float()
        res = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = res.transpose(0, 1)
    return out


def _run(ops, q, kc, vc, tables, seq_lens, starts, scale, window=0):
    k_layout = kc.permute(0, 2, 3, 1).contiguous()  # [NB, Hkv, D, BS]
    v_layout = vc.permute(0, 2, 1, 3).contiguous()  # [NB, Hkv, BS, D]
    max_q = int((starts[1:] - starts[:-1]).max())
    return ops.paged_attention_multi(
        q, k_layout, v_layout, tables, seq_lens, starts, scale, int(seq_lens.max()), max_q, window
    )


@pytest.mark.parametrize(
    "q_dtype,cache_dtype,tol",
    [
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.bfloat16, 2e-2),
        (torch.float32, torch.bfloat16, 1e-5),
    ],
)
@pytest.mark.parametrize(
    "head_dim,heads,kv_heads,block_size",
    [(64, 9, 3, 16), (16, 4, 2, 16), (128, 8, 8, 32), (80, 8, 1, 16)],
)
def test_matches_causal_reference(
    ops, q_dtype, cache_dtype, tol, head_dim, heads, kv_heads, block_size
):
    # One query (a plain decode), drafts of several lengths, a sequence made only of its queries,
    # and lengths on both sides of block edges.
    case = _case(
        q_dtype,
        cache_dtype,
        head_dim,
        heads,
        kv_heads,
        block_size,
        q_lens=[1, 5, 3, 2, 4],
        seq_lens=[1, 37, 3, 16, 100],
    )
    got = _run(ops, *case)
    ref = _reference(*case)
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("window", [1, 4, 16, 17, 37, 99, 1000])
@pytest.mark.parametrize("q_dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sliding_window_matches_reference(ops, window, q_dtype, tol):
    """Each query row sees only its last ``window`` keys: windows inside a block, on block
    edges, shorter than the drafts, longer than some sequences or all of them."""
    case = _case(
        q_dtype, q_dtype, 64, 9, 3, 16, q_lens=[1, 5, 3, 2, 4], seq_lens=[1, 37, 3, 16, 100]
    )
    got = _run(ops, *case, window=window)
    torch.testing.assert_close(got.float(), _reference(*case, window=window), rtol=tol, atol=tol)
    if window < 37:  # and it is not attention over everything
        assert not torch.allclose(got.float(), _reference(*case), rtol=tol, atol=tol)


def test_single_query_rows_equal_the_decode_kernel(ops):
    q, kc, vc, tables, seq_lens, starts, scale = _case(
        torch.bfloat16, torch.bfloat16, 64, 9, 3, 16, q_lens=[1] * 4, seq_lens=[5, 40, 17, 64]
    )
    multi = _run(ops, q, kc, vc, tables, seq_lens, starts, scale)
    k_layout = kc.permute(0, 2, 3, 1).contiguous()
    v_layout = vc.permute(0, 2, 1, 3).contiguous()
    decode = ops.paged_attention_decode(
        q, k_layout, v_layout, tables, seq_lens, scale, int(seq_lens.max())
    )
    torch.testing.assert_close(multi.float(), decode.float(), rtol=1e-2, atol=1e-2)


def test_bad_input_gets_a_clear_error(ops):
    q, kc, vc, tables, seq_lens, starts, scale = _case(
        torch.float32, torch.float32, 64, 9, 3, 16, q_lens=[2, 3], seq_lens=[10, 20]
    )
    k_layout = kc.permute(0, 2, 3, 1).contiguous()
    v_layout = vc.permute(0, 2, 1, 3).contiguous()
    op = ops.paged_attention_multi
    with pytest.raises(RuntimeError, match="max_query_len"):
        op(q, k_layout, v_layout, tables, seq_lens, starts, scale, 20, 30)  # 30 x 3 rows > 64
    with pytest.raises(RuntimeError, match="q_len"):
        op(q, k_layout, v_layout, tables, seq_lens, starts, scale, 20, 2)  # a q_len of 3 > 2
    with pytest.raises(RuntimeError, match="query_start_loc"):
        op(q, k_layout, v_layout, tables, seq_lens, starts[:2], scale, 20, 3)
    with pytest.raises(RuntimeError, match="int64"):
        op(q, k_layout, v_layout, tables, seq_lens, starts.int(), scale, 20, 3)


@pytest.mark.parametrize("block_size", [16, 32, 48])
def test_amx_tile_path_matches_causal_reference(ops, block_size):
    # bf16, head_dim 64 and at most 16 query rows per kv head (4 x 4 here): on a CPU with AMX
    # the products run on tiles, with keys repacked per 16 (K) and 32 (V) across block edges.
    case = _case(
        torch.bfloat16,
        torch.bfloat16,
        64,
        8,
        2,
        block_size,
        q_lens=[1, 4, 3, 2, 4, 1],
        seq_lens=[1, 37, 3, 16, 100, 33],
    )
    got = _run(ops, *case)
    ref = _reference(*case)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_slots_past_the_sequence_are_never_read(ops, q_dtype):
    """A block's slots past the sequence's end may hold anything (a freed block's old rows):
    NaN there changes nothing, in the last block's tail or in whole blocks past the end."""
    case = list(_case(q_dtype, q_dtype, 64, 9, 3, 16, q_lens=[1, 5, 3, 2], seq_lens=[7, 37, 3, 17]))
    clean = _run(ops, *case)
    kc, vc, tables, seq_lens = case[1], case[2], case[3], case[4]
    for b, n in enumerate(seq_lens.tolist()):
        last = tables[b, (n - 1) // 16]
        kc[last, n % 16 or 16 :] = float("nan")
        vc[last, n % 16 or 16 :] = float("nan")
        kc[tables[b, (n - 1) // 16 + 1 :]] = float("nan")  # whole blocks past the end
        vc[tables[b, (n - 1) // 16 + 1 :]] = float("nan")
    got = _run(ops, *case)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, clean, rtol=0, atol=0)
