"""The native decode kernel == the torch fallback (gather + SDPA) == plain attention, with
random block tables, GQA, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.model_executor.ops import native_ops_available


def _reference(q, kc, vc, tables, lens, scale):
    """kc, vc in the natural [num_blocks, block_size, kv_heads, head_dim] layout."""
    outs = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        k = kc[tables[b]].flatten(0, 1)[:n].transpose(0, 1).float()
        v = vc[tables[b]].flatten(0, 1)[:n].transpose(0, 1).float()
        qb = q[b].float().unsqueeze(1)  # [H, 1, D]
        outs.append(
            F.scaled_dot_product_attention(qb, k, v, scale=scale, enable_gqa=True).squeeze(1)
        )
    return torch.stack(outs)


@pytest.mark.skipif(not native_ops_available(), reason="native kernels not built (make setup)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    "head_dim,heads,kv_heads,block_size",
    [(64, 9, 3, 16), (16, 4, 2, 1), (128, 8, 8, 5), (64, 8, 2, 32)],
)
def test_native_decode_matches_reference(dtype, tol, head_dim, heads, kv_heads, block_size):
    torch.manual_seed(0)
    lens = torch.tensor([1, 7, 33, 100, 64], dtype=torch.long)
    nb = int(-(-lens.max() // block_size))
    num_blocks = 5 * nb + 3
    kc = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    vc = torch.randn_like(kc)
    tables = torch.randperm(num_blocks)[: 5 * nb].view(5, nb).long()
    q = torch.randn(5, heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    k_layout = kc.permute(0, 2, 3, 1).contiguous()  # [NB, Hkv, D, BS]
    v_layout = vc.permute(0, 2, 1, 3).contiguous()  # [NB, Hkv, BS, D]
    got = torch.ops.pagedllm.paged_attention_decode(
        q, k_layout, v_layout, tables, lens, scale, int(lens.max())
    )
    ref = _reference(q, kc, vc, tables, lens, scale)
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)
