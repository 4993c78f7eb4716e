"""The KV cache's huge-page allocation behaves like torch.zeros."""

from __future__ import annotations

import torch

from pagedllm.model_executor.hugepages import zeros_hugepage


def test_zeros_hugepage_is_a_zeroed_writable_independent_tensor():
    a = zeros_hugepage((64, 3, 16, 8), torch.bfloat16)
    b = zeros_hugepage((64, 3, 16, 8), torch.bfloat16)
    assert a.shape == (64, 3, 16, 8) and a.dtype == torch.bfloat16 and a.is_contiguous()
    assert not a.any()
    a[5, 1] = 2.5
    assert a.sum().item() == 2.5 * 16 * 8
    assert not b.any()
    assert zeros_hugepage((0, 4), torch.float32).shape == (0, 4)
