"""Each ISA's elementwise kernels == their torch definitions (TorchKernels), on widths that are
and are not a multiple of the 16-lane vectors (the tail loop), in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.model_executor.backends.kernels import NativeKernels, TorchKernels


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("width", [1536, 37, 16])
def test_silu_and_mul(ops, dtype, tol, width):
    torch.manual_seed(0)
    x = (torch.randn(5, 2 * width) * 4).to(dtype)  # wide range: exp's clamps and polynomial
    got = ops.silu_and_mul(x)
    gate, up = x.float().chunk(2, dim=-1)
    torch.testing.assert_close(got.float(), F.silu(gate) * up, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("out_features,in_features", [(3072, 576), (77, 32), (5, 16)])
def test_int8_linear_matches_torch_int8_kernel(ops, dtype, rows, out_features, in_features):
    """Native int8 GEMV == torch._weight_int8pack_mm (row tails not a multiple of 4 included)."""
    torch.manual_seed(0)
    x = torch.randn(rows, in_features).to(dtype)
    w = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    scales = torch.rand(out_features) / 100
    got = ops.int8_linear(x, w, scales)
    ref = torch._weight_int8pack_mm(x.float(), w, scales).to(dtype)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    # fp32 sums of up to 576 products in another order: relative 1e-4
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("width", [576, 37])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_norms_match_torch(ops, width, out_dtype):
    torch.manual_seed(0)
    native, ref = NativeKernels(ops), TorchKernels()
    x, delta, w = torch.randn(7, width), torch.randn(7, width), torch.rand(width) + 0.5
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    got = native.rms_norm(x, w, 1e-6, out_dtype)
    torch.testing.assert_close(got, ref.rms_norm(x, w, 1e-6, out_dtype), rtol=tol, atol=tol)
    r1, r2 = x.clone(), x.clone()
    got = native.add_rms_norm(r1, delta, w, 1e-6, out_dtype)
    want = ref.add_rms_norm(r2, delta, w, 1e-6, out_dtype)
    torch.testing.assert_close(r1, r2, rtol=1e-6, atol=1e-6)  # the residual, updated in place
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rotary_matches_torch(ops, dtype, tol):
    torch.manual_seed(0)
    positions = torch.tensor([0, 5, 17, 511, 3])
    freqs = torch.outer(torch.arange(512.0), 1.0 / 10000 ** (torch.arange(0, 64, 2) / 64))
    cos, sin = freqs.cos(), freqs.sin()
    q, k = torch.randn(5, 9, 64).to(dtype), torch.randn(5, 3, 64).to(dtype)
    want_q, want_k = TorchKernels().rotary(positions, q.clone(), k.clone(), cos, sin)
    got_q, got_k = NativeKernels(ops).rotary(positions, q.clone(), k.clone(), cos, sin)
    torch.testing.assert_close(got_q.float(), want_q.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got_k.float(), want_k.float(), rtol=tol, atol=tol)
