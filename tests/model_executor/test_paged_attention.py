"""Each ISA's decode kernel == the torch backend (gather + SDPA) == plain attention, with
random block tables, GQA, fp32 and bf16 (the ``ops`` fixture: once per ISA this CPU runs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.model_executor.backends import TORCH_BACKEND
from pagedllm.model_executor.backends.cpu_attention import NativeAttentionBackend
from pagedllm.model_executor.backends.torch_attention import int8_views


def _reference(q, kc, vc, tables, lens, scale, window=0):
    """kc, vc in the natural [num_blocks, block_size, kv_heads, head_dim] layout; ``window``:
    only the last that many keys."""
    outs = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        first = max(0, n - window) if window else 0
        k = kc[tables[b]].flatten(0, 1)[first:n].transpose(0, 1).float()
        v = vc[tables[b]].flatten(0, 1)[first:n].transpose(0, 1).float()
        qb = q[b].float().unsqueeze(1)  # [H, 1, D]
        outs.append(
            F.scaled_dot_product_attention(qb, k, v, scale=scale, enable_gqa=True).squeeze(1)
        )
    return torch.stack(outs)


def _decode_case(dtype, head_dim, heads, kv_heads, block_size):
    """Five sequences (lengths 1 to 100) over shuffled blocks of a natural-layout cache."""
    torch.manual_seed(0)
    lens = torch.tensor([1, 7, 33, 100, 64], dtype=torch.long)
    nb = int(-(-lens.max() // block_size))
    num_blocks = 5 * nb + 3
    kc = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    vc = torch.randn_like(kc)
    tables = torch.randperm(num_blocks)[: 5 * nb].view(5, nb).long()
    q = torch.randn(5, heads, head_dim).to(dtype)
    return q, kc, vc, tables, lens, head_dim**-0.5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    "head_dim,heads,kv_heads,block_size",
    [(64, 9, 3, 16), (16, 4, 2, 1), (128, 8, 8, 5), (64, 8, 2, 32)],
)
def test_native_decode_matches_reference(ops, dtype, tol, head_dim, heads, kv_heads, block_size):
    q, kc, vc, tables, lens, scale = _decode_case(dtype, head_dim, heads, kv_heads, block_size)
    k_layout = kc.permute(0, 2, 3, 1).contiguous()  # [NB, Hkv, D, BS]
    v_layout = vc.permute(0, 2, 1, 3).contiguous()  # [NB, Hkv, BS, D]
    got = ops.paged_attention_decode(q, k_layout, v_layout, tables, lens, scale, int(lens.max()))
    ref = _reference(q, kc, vc, tables, lens, scale)
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("window", [1, 5, 16, 37, 64, 100, 1000])
@pytest.mark.parametrize("cache", ["model", "int8"])
def test_native_decode_sliding_window(ops, window, cache):
    """A sliding window: each sequence (lengths 1 to 100) attends only its last ``window``
    keys; windows inside a block, on block edges, longer than some sequences or all."""
    q, kc, vc, tables, lens, scale = _decode_case(torch.float32, 64, 9, 3, 16)
    if cache == "int8":
        k_layout, v_layout = _int8_cache(kc, vc, ops)
        kc, vc = _dequantized(k_layout, v_layout, 64)
    else:
        k_layout = kc.permute(0, 2, 3, 1).contiguous()
        v_layout = vc.permute(0, 2, 1, 3).contiguous()
    max_len = int(lens.max())
    got = ops.paged_attention_decode(q, k_layout, v_layout, tables, lens, scale, max_len, window)
    ref = _reference(q, kc, vc, tables, lens, scale, window)
    torch.testing.assert_close(got.float(), ref, rtol=1e-5, atol=1e-5)
    if window < max_len:  # and it is not attention over everything
        full = _reference(q, kc, vc, tables, lens, scale)
        assert (got.float() - full).abs().max() > 1e-3


def _attention(ops):
    """The attention backend on ``ops``' kernels, or the torch one for ``ops=None``."""
    if ops is None:
        return TORCH_BACKEND.attention
    return NativeAttentionBackend(ops, torch.float32)


def _int8_cache(kc, vc, ops):
    """Quantize natural-layout caches ([NB, BS, Hkv, D]) into int8 records through write_kv."""
    nb, bs, h, d = kc.shape
    k8 = torch.zeros(nb, h, bs * (d + 4), dtype=torch.int8)
    v8 = torch.zeros_like(k8)
    slots = torch.arange(nb * bs)
    _attention(ops).write_kv(k8, v8, kc.flatten(0, 1), vc.flatten(0, 1), slots)
    return k8, v8


def _dequantized(k8, v8, head_dim):
    """int8 records -> natural-layout fp32 caches [NB, BS, Hkv, D]."""
    kv, ks = int8_views(k8, head_dim, transposed=True)
    vv, vs = int8_views(v8, head_dim, transposed=False)
    k = (kv.float() * ks[:, :, None, :]).permute(0, 3, 1, 2)
    v = (vv.float() * vs[..., None]).permute(0, 2, 1, 3)
    return k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_cache_write_native_equals_torch(ops, dtype):
    torch.manual_seed(0)
    kc = (torch.randn(6, 16, 3, 64) * torch.rand(6, 16, 3, 1) * 4).to(dtype)
    kc[0, 0, 0] = 0  # an all-zero head: scale 0, values 0
    vc = torch.randn_like(kc)
    native = _int8_cache(kc, vc, ops)
    fallback = _int8_cache(kc, vc, None)
    assert torch.equal(native[0], fallback[0]) and torch.equal(native[1], fallback[1])
    k, v = _dequantized(*native, 64)
    # symmetric int8 per (token, head): error at most half a step of max|x| / 127
    step = kc.float().abs().amax(-1, keepdim=True) / 127
    assert ((k - kc.float()).abs() <= step / 2 + 1e-6).all()
    assert k[0, 0, 0].abs().max() == 0
    torch.testing.assert_close(v, vc.float(), atol=0.02, rtol=0.02)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(
    "head_dim,heads,kv_heads,block_size",
    [(64, 9, 3, 16), (32, 4, 4, 32), (64, 10, 2, 16), (128, 8, 1, 16)],
)
def test_native_int8_decode_matches_dequantized_reference(
    ops, dtype, tol, head_dim, heads, kv_heads, block_size
):
    """The kernel on int8 records == exact attention over the dequantized K/V (GQA groups of
    3, 1, 5 (runtime group size) and 8)."""
    q, kc, vc, tables, lens, scale = _decode_case(dtype, head_dim, heads, kv_heads, block_size)
    k8, v8 = _int8_cache(kc, vc, ops)
    got = ops.paged_attention_decode(q, k8, v8, tables, lens, scale, int(lens.max()))
    kd, vd = _dequantized(k8, v8, head_dim)
    ref = _reference(q, kd, vd, tables, lens, scale)
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)
    # and int8 stays close to attention over the unquantized cache
    exact = _reference(q, kc, vc, tables, lens, scale)
    assert (got.float() - exact).abs().max() < 0.05


@pytest.mark.parametrize(
    "head_dim,heads,kv_heads,block_size",
    [(64, 9, 3, 16), (16, 4, 2, 1), (64, 10, 2, 32), (128, 8, 8, 5)],
)
def test_bf16_cache_under_fp32(ops, head_dim, heads, kv_heads, block_size):
    """--kv-cache-dtype bfloat16 with an fp32 model: fp32 K/V written into a bf16 cache (native
    == torch's rounding, bit for bit), then fp32 q against it == exact fp32 attention over the
    rounded K/V, with an fp32 output."""
    q, kc, vc, tables, lens, scale = _decode_case(
        torch.float32, head_dim, heads, kv_heads, block_size
    )
    nb = kc.shape[0]
    slots = torch.arange(nb * block_size)
    caches = []
    for writer in (ops, None):
        k16 = torch.zeros(nb, kv_heads, head_dim, block_size, dtype=torch.bfloat16)
        v16 = torch.zeros(nb, kv_heads, block_size, head_dim, dtype=torch.bfloat16)
        _attention(writer).write_kv(k16, v16, kc.flatten(0, 1), vc.flatten(0, 1), slots)
        caches.append((k16, v16))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    k16, v16 = caches[0]
    assert torch.equal(k16, kc.to(torch.bfloat16).permute(0, 2, 3, 1))
    got = ops.paged_attention_decode(q, k16, v16, tables, lens, scale, int(lens.max()))
    assert got.dtype == torch.float32
    ref = _reference(q, kc.to(torch.bfloat16), vc.to(torch.bfloat16), tables, lens, scale)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # bf16 rounding of K/V alone moves the output by well under bf16's step
    exact = _reference(q, kc, vc, tables, lens, scale)
    assert (got - exact).abs().max() < 0.02


def test_fp16_q_with_bf16_cache_is_refused(ops):
    q, kc, vc, tables, lens, scale = _decode_case(torch.float16, 64, 4, 2, 16)
    k16 = kc.to(torch.bfloat16).permute(0, 2, 3, 1).contiguous()
    v16 = vc.to(torch.bfloat16).permute(0, 2, 1, 3).contiguous()
    with pytest.raises(RuntimeError, match="bf16 under fp32"):
        ops.paged_attention_decode(q, k16, v16, tables, lens, scale, 100)
