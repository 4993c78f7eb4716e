"""The native elementwise kernels == their torch definitions, on widths that are and are not a
multiple of the 16-lane vectors (the tail loop), in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.model_executor.ops import native_ops_available

pytestmark = pytest.mark.skipif(not native_ops_available(), reason="native kernels not built")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("width", [1536, 37, 16])
def test_silu_and_mul(dtype, tol, width):
    torch.manual_seed(0)
    x = (torch.randn(5, 2 * width) * 4).to(dtype)  # wide range: exp's clamps and polynomial
    got = torch.ops.pagedllm.silu_and_mul(x)
    gate, up = x.float().chunk(2, dim=-1)
    torch.testing.assert_close(got.float(), F.silu(gate) * up, rtol=tol, atol=tol)


@pytest.mark.skipif(not native_ops_available(), reason="native kernels not built (make setup)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("out_features,in_features", [(3072, 576), (77, 32), (5, 16)])
def test_int8_linear_matches_torch_int8_kernel(dtype, rows, out_features, in_features):
    """Native int8 GEMV == torch._weight_int8pack_mm (row tails not a multiple of 4 included)."""
    torch.manual_seed(0)
    x = torch.randn(rows, in_features).to(dtype)
    w = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    scales = torch.rand(out_features) / 100
    got = torch.ops.pagedllm.int8_linear(x, w, scales)
    ref = torch._weight_int8pack_mm(x.float(), w, scales).to(dtype)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    # fp32 sums of up to 576 products in another order: relative 1e-4
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
