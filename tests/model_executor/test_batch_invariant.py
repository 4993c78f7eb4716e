"""--deterministic's kernels: bi_linear computes x W^T (+ b) and gives every row the same bits
alone as inside any batch, at any place in it; the batch-invariant backend is chosen by the
selector only on native kernels, and refuses what it cannot make invariant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.config import EngineArgs
from pagedllm.model_executor.backends import TORCH_BACKEND, select_backend
from pagedllm.model_executor.backends.batch_invariant import (
    BatchInvariantLinearBackend,
    batch_invariant,
)
from pagedllm.model_executor.layers.linear import Linear, pack_linear_weights
from tests.utils import get_backend, native_isa_names

SHAPES = [(576, 1536), (960, 576), (40, 64), (77, 33)]  # (out, in): panel tails, odd k


def _layer(isa: str, dtype: torch.dtype, out: int, inp: int, bias: bool) -> Linear:
    torch.manual_seed(out + inp)
    layer = Linear(inp, out, bias=bias)
    batch_invariant(get_backend(isa, dtype), dtype).bind(layer)
    layer.weight.data = (torch.randn(out, inp) / inp**0.5).to(dtype)
    if bias:
        layer.bias.data = torch.randn(out).to(dtype)
    pack_linear_weights(layer, keep_plain=(layer,))  # the plain weight: the reference
    return layer


@pytest.mark.parametrize("isa", native_isa_names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("out,inp", SHAPES)
def test_bi_linear_matches_reference(isa, dtype, out, inp):
    layer = _layer(isa, dtype, out, inp, bias=True)
    assert isinstance(layer.linear_backend, BatchInvariantLinearBackend)
    w, b = layer.weight.float(), layer.bias.float()
    x = torch.randn(37, inp).to(dtype)
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == dtype and got.shape == (37, out)
    want = F.linear(x.float(), w, b)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("isa", native_isa_names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("out,inp", SHAPES[:2])
def test_bi_linear_rows_are_batch_invariant(isa, dtype, out, inp):
    """Each row's bits alone == inside batches of every size (row tiles, their tails, row
    chunks), at every place."""
    layer = _layer(isa, dtype, out, inp, bias=False)
    x = torch.randn(300, inp).to(dtype)
    with torch.inference_mode():
        alone = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
        for m in (2, 3, 5, 17, 64, 129, 300):
            for start in (0, 1, 300 - m):
                got = layer(x[start : start + m])
                assert torch.equal(got, alone[start : start + m]), (m, start)
        # and rows shuffled: each row's result follows it
        perm = torch.randperm(x.shape[0])
        assert torch.equal(layer(x[perm]), alone[perm])


@pytest.mark.parametrize("isa", native_isa_names())
def test_selector_builds_the_invariant_variant_of_the_isa(isa):
    backend = select_backend(
        torch.device("cpu"), torch.bfloat16, 64, 16, False, isa=isa, deterministic=True
    )
    assert backend.name == f"{isa}+deterministic"
    assert backend.attention.per_token_rows
    assert not backend.linear.pads_rows
    assert "batch-invariant" in backend.describe()


def test_deterministic_refuses_what_it_cannot_make_invariant():
    with pytest.raises(ValueError, match="native CPU kernels"):
        batch_invariant(TORCH_BACKEND, torch.float32)
    with pytest.raises(ValueError, match="quantization='int8'"):
        EngineArgs(deterministic=True, quantization="int8")
    isa = native_isa_names()[0]
    with pytest.raises(ValueError, match="head_dim 24"):
        select_backend(torch.device("cpu"), torch.float32, 24, 16, False, isa, deterministic=True)
