"""--quantization int8: a Linear keeps an int8 copy of its weight and uses it only for steps of
at most INT8_MAX_ROWS rows; larger steps run the full-precision (packed) weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.model_executor.backends.linear import INT8_MAX_ROWS
from pagedllm.model_executor.layers.linear import Linear, pack_linear_weights
from tests.utils import backend_names, get_backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", backend_names())
def test_int8_weights_serve_small_steps_only(dtype, backend):
    torch.manual_seed(0)
    layer = Linear(64, 40, bias=True)
    get_backend(backend, dtype).bind(layer)
    layer.weight.data = (torch.randn(40, 64) * 0.1).to(dtype)
    layer.bias.data = torch.randn(40).to(dtype)
    full_weight = layer.weight.detach().clone()
    layer.quantize_int8()
    pack_linear_weights(layer)  # may drop the plain weight, as in the model runner
    # the int8 copy: per output channel, within half a step of the weight
    step = full_weight.float().abs().amax(1, keepdim=True) / 127
    dequant = layer.int8_weight.float() * layer.int8_scales[:, None]
    assert ((dequant - full_weight.float()).abs() <= step / 2 + 1e-6).all()

    with torch.inference_mode():
        small = torch.randn(INT8_MAX_ROWS, 64).to(dtype)
        got = layer(small).float()
        want_int8 = F.linear(small.float(), dequant, layer.bias.float())
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got, want_int8, rtol=tol, atol=tol)
        # and int8 rounding shows: not the full-precision result exactly
        exact = F.linear(small.float(), full_weight.float(), layer.bias.float())
        assert (got - exact).abs().max() > 0
        torch.testing.assert_close(got, exact, rtol=0.05, atol=0.05)

        large = torch.randn(INT8_MAX_ROWS + 1, 64).to(dtype)
        want = F.linear(large.float(), full_weight.float(), layer.bias.float())
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(layer(large).float(), want, rtol=tol, atol=tol)
