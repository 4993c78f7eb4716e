"""The AMX linear kernel (ops/csrc/x86/amx/amx_linear.cpp) == x . W^T to bf16 output rounding,
for any row count (partial 16-row tiles included) and rows taken from a wider matrix; a bf16
Linear on the amx backend uses it for steps of at most AMX_LINEAR_MAX_ROWS rows and oneDNN above.
The kernel runs only where the CPU has AMX (the ``amx_ops`` cases); every backend's bf16 Linear
is checked wherever it runs."""

from __future__ import annotations

import pytest
import torch

from pagedllm.cpu_info import has_native_bf16, onednn_packs_bf16
from pagedllm.model_executor.backends.linear import AMX_LINEAR_MAX_ROWS, pack_amx
from pagedllm.model_executor.layers.linear import Linear, pack_linear_weights
from pagedllm.model_executor.ops import native_ops
from tests.utils import backend_names, get_backend, native_isa_names


@pytest.fixture(params=[isa for isa in native_isa_names() if isa == "amx"])
def amx_ops(request):
    """The amx ISA's kernels: only on a CPU with AMX (elsewhere no case runs)."""
    return native_ops(request.param)


def assert_bf16_rounding_of(got: torch.Tensor, exact: torch.Tensor) -> None:
    """Each output within its own bf16 rounding (half a step: 2^-9 relative) of the exact
    product, plus fp32 accumulation slack."""
    err = (got.double() - exact).abs()
    assert (err <= exact.abs() * 2.0**-8 + 1e-4).all(), (err / exact.abs().clamp(min=1e-3)).max()


@pytest.mark.parametrize("n,k", [(32, 64), (960, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 31, 32, 33, 100, 256])
def test_amx_linear_matches_exact_product(amx_ops, n, k, rows):
    torch.manual_seed(rows)
    w = torch.randn(n, k).to(torch.bfloat16)
    wide = torch.randn(rows, k + 96).to(torch.bfloat16)
    x = wide[:, 32 : 32 + k]  # rows with a stride, as views of a fused projection have
    got = amx_ops.amx_linear(x, pack_amx(w))
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert_bf16_rounding_of(got, x.double() @ w.double().t())


def test_pack_amx_layout():
    w = torch.arange(64 * 96, dtype=torch.float32).view(64, 96).to(torch.bfloat16)
    wp = pack_amx(w)
    for nb, kc, r, c, e in [(0, 0, 0, 0, 0), (1, 2, 3, 4, 1), (3, 2, 15, 15, 1)]:
        assert wp[nb, kc, r, c, e] == w[16 * nb + c, 32 * kc + 2 * r + e]


def test_amx_linear_rejects_bad_input(amx_ops):
    w = pack_amx(torch.randn(64, 64).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="columns"):
        amx_ops._ops.amx_linear(torch.randn(4, 32).to(torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="bf16"):
        amx_ops._ops.amx_linear(torch.randn(4, 64), w)
    with pytest.raises(RuntimeError, match="packed"):
        amx_ops._ops.amx_linear(torch.randn(4, 64).to(torch.bfloat16), w.float())


def test_linear_uses_the_kernel_for_small_steps_only(amx_ops, monkeypatch):
    torch.manual_seed(0)
    layer = Linear(576, 960, bias=False).to(torch.bfloat16)
    get_backend("amx", torch.bfloat16).bind(layer)
    exact_weight = layer.weight.detach().double()
    pack_linear_weights(layer)
    assert layer.amx_weight is not None and layer.packed_weight is not None
    calls = []

    def counted(x, w):
        calls.append(x.shape[0])
        return linear_kernel(x, w)

    ops = layer.linear_backend.ops
    linear_kernel = ops.amx_linear
    monkeypatch.setattr(ops, "amx_linear", counted)
    with torch.inference_mode():
        for rows in [1, AMX_LINEAR_MAX_ROWS, AMX_LINEAR_MAX_ROWS + 1]:
            calls.clear()
            x = torch.randn(rows, 576)  # fp32 in, as the model's residual stream is
            got = layer(x)
            assert calls == ([rows] if rows <= AMX_LINEAR_MAX_ROWS else []), rows
            assert_bf16_rounding_of(got, x.to(torch.bfloat16).double() @ exact_weight.t())


@pytest.mark.parametrize("backend", backend_names())
@pytest.mark.parametrize("out_features,bias", [(48, False), (64, True)])
def test_no_kernel_for_shapes_it_cannot_take(backend, out_features, bias):
    """48 outputs are not a multiple of 32; the kernel adds no bias: oneDNN serves them (its
    packed bf16 layout where this CPU has bf16 dot products, packed in fp32 where it has none,
    else the plain weight)."""
    layer = Linear(64, out_features, bias=bias).to(torch.bfloat16)
    get_backend(backend, torch.bfloat16).bind(layer)
    weight = layer.weight.detach().double()
    bias = 0 if layer.bias is None else layer.bias.detach().double()
    pack_linear_weights(layer)
    assert layer.amx_weight is None
    if has_native_bf16():
        assert (layer.packed_weight is not None) == onednn_packs_bf16()
    else:  # widened: bf16 products are exact in fp32
        assert layer.packed_weight is not None and layer.packed_weight.dtype == torch.float32
    x = torch.randn(3, 64).to(torch.bfloat16)
    with torch.inference_mode():
        want = x.double() @ weight.t() + bias
        assert_bf16_rounding_of(layer(x), want)
