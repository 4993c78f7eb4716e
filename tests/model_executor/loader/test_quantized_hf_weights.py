"""AWQ / GPTQ / compressed-tensors tensors become QuantTensors of affine groups that decode to
the weights the formats' own code defines; configs and checkpoints pagedllm cannot run are
refused with a ValueError naming what.

The data/ fixtures were packed by the libraries' own code (AutoAWQ 0.2.9
``WQLinear_GEMM.from_linear``; GPTQModel 7.7.0 ``pack_original``, zero points as it packs them,
i.e. the gptq_v2 convention) from the codes, scales and zero points stored beside them; the
compressed-tensors cases run the library's PackedQuantizationCompressor here."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from pagedllm.model_executor.layers.quant_tensor import AffineType
from pagedllm.model_executor.loader.quantized_hf_weights import (
    iter_quantized_hf_weights,
    parse_quantization_config,
)
from tests.quantized_checkpoints import (
    awq_tensors,
    compressed_tensors_tensors,
    gptq_tensors,
    quantization_config,
)

DATA = os.path.join(os.path.dirname(__file__), "data")


def _decoded(config: dict, tensors: dict[str, torch.Tensor], layer="model.layers.0.mlp.up_proj"):
    q = parse_quantization_config(config, "ckpt")
    named = [(f"{layer}.{k}", v) for k, v in tensors.items()]
    ((name, qt),) = list(iter_quantized_hf_weights(named, q))
    assert name == f"{layer}.weight"
    return qt


def _expected(f: dict) -> torch.Tensor:
    g_idx = f["g_idx"].long() if "g_idx" in f else torch.arange(f["codes"].shape[1]) // 32
    s = f["code_scales"].float()[:, g_idx]
    return (f["codes"].float() - f["code_zeros"].float()[:, g_idx]) * s


def test_awq_fixture_from_autoawq():
    f = load_file(os.path.join(DATA, "awq_gemm_autoawq_0_2_9.safetensors"))
    parts = {k: f[k] for k in ("qweight", "qzeros", "scales")}
    qt = _decoded(quantization_config("awq", 4, 32, False, False), parts)
    assert qt.qtype == AffineType.A4G32 and qt.perm is None
    torch.testing.assert_close(qt.dequantize(), _expected(f), rtol=0, atol=1e-6)
    # the packer the model tests use writes what AutoAWQ writes
    mine = awq_tensors(f["codes"], f["code_scales"].float(), f["code_zeros"].int())
    for k in ("qweight", "qzeros", "scales"):
        assert torch.equal(mine[k], f[k]), k


@pytest.mark.parametrize(
    "fixture,bits,act_order",
    [("gptq_4bit_act_order_gptqmodel_7_7_0", 4, True), ("gptq_8bit_gptqmodel_7_7_0", 8, False)],
)
def test_gptq_fixture_from_gptqmodel(fixture, bits, act_order):
    f = load_file(os.path.join(DATA, f"{fixture}.safetensors"))
    parts = {"qweight": f["qweight"], "qzeros": f["qzeros_v2"], "scales": f["scales"]}
    parts["g_idx"] = f["g_idx"]
    config = quantization_config("gptq", bits, 32, False, act_order)
    config["checkpoint_format"] = "gptq_v2"
    qt = _decoded(config, parts)
    assert (qt.perm is not None) == act_order
    assert qt.qtype == AffineType(bits * 1000 + 32)
    torch.testing.assert_close(qt.dequantize(), _expected(f), rtol=0, atol=1e-6)
    mine = gptq_tensors(
        f["codes"], f["code_scales"].float(), f["code_zeros"].int(), bits, f["g_idx"], v1=False
    )
    assert torch.equal(mine["qweight"], f["qweight"])
    assert torch.equal(mine["qzeros"], f["qzeros_v2"])
    # the original ("gptq", v1) format stores zero points minus one: same weights
    v1 = gptq_tensors(
        f["codes"], f["code_scales"].float(), f["code_zeros"].int(), bits, f["g_idx"], v1=True
    )
    qt1 = _decoded(quantization_config("gptq", bits, 32, False, act_order), v1)
    torch.testing.assert_close(qt1.dequantize(), _expected(f), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "bits,group,sym", [(4, 32, True), (4, 64, False), (8, -1, True), (8, 128, False)]
)
def test_compressed_tensors_decode_as_the_library_does(bits, group, sym):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.05
    packed, decoded = compressed_tensors_tensors(w, bits, group, sym)
    qt = _decoded(quantization_config("compressed-tensors", bits, group, sym, False), packed)
    qtype = AffineType(qt.qtype)
    assert qtype.bits == bits and qtype.group == (128 if group == -1 else group)
    torch.testing.assert_close(qt.dequantize(), decoded, rtol=1e-6, atol=1e-6)
    # the codes stay b bits, plus an fp32 scale and offset per group
    assert qt.data.numel() == w.numel() * bits // 8 + w.numel() // qtype.group * 8


def test_other_tensors_pass_through_and_parts_may_come_in_any_order():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * 0.05
    packed, decoded = compressed_tensors_tensors(w, 4, 32, True)
    q = parse_quantization_config(
        quantization_config("compressed-tensors", 4, 32, True, False), "c"
    )
    stream = [("model.norm.weight", torch.ones(4))]
    stream += [(f"model.layers.0.self_attn.o_proj.{k}", v) for k, v in reversed(packed.items())]
    out = dict(iter_quantized_hf_weights(stream, q))
    assert set(out) == {"model.norm.weight", "model.layers.0.self_attn.o_proj.weight"}
    torch.testing.assert_close(
        out["model.layers.0.self_attn.o_proj.weight"].dequantize(), decoded, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    "config,match",
    [
        ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
        ({"quant_method": "awq", "bits": 3, "group_size": 128}, "bits=3"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version 'gemv'"),
        ({"quant_method": "gptq", "bits": 2, "group_size": 128}, "bits=2"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 16}, "group_size 16"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "marlin"),
    ],
)
def test_unsupported_configs_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        parse_quantization_config(config, "/ckpt")


def test_unsupported_compressed_tensors_schemes_are_refused():
    base = quantization_config("compressed-tensors", 4, 32, True, False)
    w8a8 = {
        **base,
        "config_groups": {
            "g": {**base["config_groups"]["group_0"], "input_activations": {"num_bits": 8}}
        },
    }
    with pytest.raises(ValueError, match="activation quantization"):
        parse_quantization_config(w8a8, "/ckpt")
    fp8 = {
        **base,
        "config_groups": {
            "g": {**base["config_groups"]["group_0"], "weights": {"num_bits": 8, "type": "float"}}
        },
    }
    with pytest.raises(ValueError, match="8-bit float"):
        parse_quantization_config(fp8, "/ckpt")
    with pytest.raises(ValueError, match="format 'float-quantized'"):
        parse_quantization_config(
            {
                **base,
                "format": "float-quantized",
                "config_groups": {"g": {"weights": {"num_bits": 8}}},
            },
            "/c",
        )


def test_missing_scales_name_the_layer():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    parts = awq_tensors(codes, torch.rand(32, 2) + 0.1, torch.randint(0, 16, (32, 2)))
    del parts["scales"]
    q = parse_quantization_config(quantization_config("awq", 4, 32, False, False), "c")
    stream = [(f"model.layers.1.mlp.down_proj.{k}", v) for k, v in parts.items()]
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.weight.*lacks its scales"):
        list(iter_quantized_hf_weights(stream, q))


def test_act_order_cannot_split_input_columns():
    torch.manual_seed(0)
    k = 64
    g_idx = (torch.arange(k) // 32)[torch.randperm(k)]
    codes = torch.randint(0, 16, (32, k), dtype=torch.uint8)
    parts = gptq_tensors(codes, torch.rand(32, 2) + 0.1, torch.randint(1, 16, (32, 2)), 4, g_idx)
    qt = _decoded(quantization_config("gptq", 4, 32, False, True), parts)
    assert qt.perm is not None
    with pytest.raises(ValueError, match="act order"):
        qt.columns(0, 32)


def test_scales_that_disagree_with_the_group_size_are_refused():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (32, 128), dtype=torch.uint8)
    parts = awq_tensors(codes, torch.rand(32, 2) + 0.1, torch.randint(0, 16, (32, 2)))  # g64
    q = parse_quantization_config(quantization_config("awq", 4, 32, False, False), "c")  # g32
    stream = [(f"model.layers.0.mlp.up_proj.{k}", v) for k, v in parts.items()]
    with pytest.raises(ValueError, match="up_proj.weight: 2 scale groups for 128 inputs"):
        list(iter_quantized_hf_weights(stream, q))
