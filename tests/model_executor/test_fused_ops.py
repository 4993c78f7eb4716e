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
