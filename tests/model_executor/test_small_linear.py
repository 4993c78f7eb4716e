"""small_linear: fp32 steps of few rows straight from the row-major weight (fp32, or bf16 widened
in registers), and the native linear backend's choice of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.model_executor.backends.linear import SMALL_LINEAR_MAX_ROWS
from pagedllm.model_executor.layers.linear import Linear, pack_linear_weights
from tests.utils import get_backend, native_isa_names


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 17, 33, 64])
@pytest.mark.parametrize("out_features,in_features", [(3072, 576), (61, 1536), (5, 16), (3, 272)])
def test_small_linear_matches_fp64(ops, wdtype, rows, out_features, in_features):
    """Row tails (not a multiple of the tile's rows), output tails (not a multiple of 4), chunk
    tails (K not a multiple of 256), a bias or none."""
    torch.manual_seed(0)
    x = torch.randn(rows, in_features)
    w = torch.randn(out_features, in_features).to(wdtype)
    bias = torch.randn(out_features) if out_features % 2 else None
    got = ops.small_linear(x, w, bias)
    want = x.double() @ w.double().T + (0 if bias is None else bias.double())
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    # fp32 sums of up to 1,536 products of unit normals, in another order than fp64's
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-3 * in_features**0.5 / 10)


def test_a_row_gets_the_same_result_alone_as_among_others(ops):
    """Every tile sums its lanes in one order: row i of a 13-row step is bit-identical to row i
    run alone (a decode's logits do not depend on who decodes beside it)."""
    torch.manual_seed(1)
    x, w = torch.randn(13, 576), torch.randn(960, 576)
    together = ops.small_linear(x, w)
    for i in range(13):
        assert torch.equal(ops.small_linear(x[i : i + 1], w)[0], together[i])


def test_bad_shapes_are_clear_errors(ops):
    w = torch.randn(8, 32)
    with pytest.raises(RuntimeError, match="1 to 64 rows"):
        ops.small_linear(torch.randn(65, 32), w)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.small_linear(torch.randn(2, 24), torch.randn(8, 24))
    with pytest.raises(RuntimeError, match="fp32"):
        ops.small_linear(torch.randn(2, 32).bfloat16(), w)
    with pytest.raises(RuntimeError, match="contiguous fp32 or bf16"):
        ops.small_linear(torch.randn(2, 32), torch.randn(8, 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", native_isa_names())
def test_backend_runs_small_steps_on_the_plain_weight(isa, dtype, monkeypatch):
    """Steps of up to SMALL_LINEAR_MAX_ROWS rows run small_linear on the plain weight, which
    packing keeps for it (fp32); larger steps
    run oneDNN's packed copy. Both give F.linear's result. bf16 weights stay on oneDNN."""
    torch.manual_seed(0)
    backend = get_backend(isa, dtype)
    layer = Linear(64, 40, bias=True)
    backend.bind(layer)
    layer.weight.data = (torch.randn(40, 64) * 0.1).to(dtype)
    layer.bias.data = torch.randn(40).to(dtype)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    pack_linear_weights(layer)
    linear = backend.linear
    streams = linear.streams(weight)
    assert streams == (dtype == torch.float32)
    assert layer.weight.numel() == (weight.numel() if streams else 0)

    calls = []
    real = linear.ops.small_linear
    monkeypatch.setattr(linear.ops, "small_linear", lambda *a: calls.append(1) or real(*a))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        for rows in (1, SMALL_LINEAR_MAX_ROWS, SMALL_LINEAR_MAX_ROWS + 1):
            calls.clear()
            x = torch.randn(rows, 64).to(dtype)
            got = layer(x)
            assert got.dtype == dtype
            want = F.linear(x.float(), weight.float(), bias.float())
            torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
            assert bool(calls) == (streams and rows <= SMALL_LINEAR_MAX_ROWS)
