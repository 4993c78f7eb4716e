"""Writes AWQ, GPTQ and compressed-tensors checkpoints of an HF model for the tests, and puts
into the model the exact weights the checkpoint's codes decode to (the reference for parity).

compressed-tensors checkpoints are packed by the library itself (PackedQuantizationCompressor).
AWQ and GPTQ packers are written here from the formats' specs, as AutoAWQ's
``WQLinear_GEMM.from_linear`` and GPTQModel's pack/``dequantize_weight`` define them (both ship
on PyPI as source distributions that build native extensions; the tests do not install them);
tests/model_executor/loader/test_quantized_hf_weights.py checks them against fixtures those
libraries' own packing code produced.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARED_INPUT = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "mlp",
    "up_proj": "mlp",
}


def group_quantize(w: torch.Tensor, bits: int, g_idx: torch.Tensor, sym: bool):
    """Round-to-nearest over the groups g_idx gives each input column: (codes [N, K] unsigned,
    scales [N, groups] fp16-exact, zeros [N, groups] unsigned)."""
    groups = int(g_idx.max()) + 1
    order = torch.argsort(g_idx, stable=True)
    wg = w[:, order].reshape(w.shape[0], groups, -1)
    top = (1 << bits) - 1
    if sym:
        scales = wg.abs().amax(-1) / ((1 << (bits - 1)) - 1)
        zeros = torch.full_like(scales, float(1 << (bits - 1)))
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scales = (hi - lo) / top
        zeros = torch.round(-lo / scales.clamp(min=1e-8)).clamp(0, top)
    scales = scales.clamp(min=1e-6).half().float()
    s, z = scales[:, g_idx], zeros[:, g_idx]
    codes = torch.round(w / s + z).clamp(0, top)
    return codes.to(torch.uint8), scales, zeros.to(torch.int32)


def dequantized(codes, scales, zeros, g_idx) -> torch.Tensor:
    return (codes.float() - zeros[:, g_idx].float()) * scales[:, g_idx]


def pack_along(codes: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """uint codes -> int32 words of 32 / bits consecutive codes along ``dim`` (low bits first;
    AWQ's ``order`` puts code order[i] in slot i)."""
    per = 32 // bits
    c = codes.to(torch.int64)
    if dim == 0:
        c = c.t()
    c = c.reshape(c.shape[0], -1, per)
    if order is not None:
        c = c[..., list(order)]
    words = (c << (torch.arange(per) * bits)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.t().contiguous() if dim == 0 else words.contiguous()


def awq_tensors(codes, scales, zeros) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM: qweight [K, N/8], qzeros [K/G, N/8], scales [K/G, N] fp16."""
    return {
        "qweight": pack_along(codes.t(), 4, 1, AWQ_ORDER),
        "qzeros": pack_along(zeros.t(), 4, 1, AWQ_ORDER),
        "scales": scales.t().half().contiguous(),
    }


def gptq_tensors(codes, scales, zeros, bits, g_idx, v1=True) -> dict[str, torch.Tensor]:
    """GPTQ: qweight [K / (32/b), N] along inputs, qzeros [groups, N / (32/b)] along outputs
    (minus one in the v1 format), scales [groups, N] fp16, g_idx [K]."""
    stored = zeros - 1 if v1 else zeros
    return {
        "qweight": pack_along(codes.t(), bits, 0),
        "qzeros": pack_along(stored.t() & ((1 << bits) - 1), bits, 1),
        "scales": scales.t().half().contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }


def compressed_tensors_scheme(bits: int, group: int, sym: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    strategy = "channel" if group == -1 else "group"
    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=sym,
        strategy=strategy,
        group_size=None if group == -1 else group,
    )
    return QuantizationScheme(targets=["Linear"], weights=args)


def compressed_tensors_tensors(w, bits, group, sym):
    """The library's packer on scales/zero points chosen here; returns (tensors, the weight
    the library's own decompress gives)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    k = w.shape[1]
    g_idx = torch.arange(k) // (k if group == -1 else group)
    codes, scales, zeros = group_quantize(w, bits, g_idx, sym)
    offset = 1 << (bits - 1)
    state = {"weight": w, "weight_scale": scales.to(w.dtype)}
    if not sym:
        state["weight_zero_point"] = (zeros - offset).to(torch.int8)
    scheme = compressed_tensors_scheme(bits, group, sym)
    packed = PackedQuantizationCompressor.compress(state, scheme)
    decoded = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    return packed, decoded.float()


def quantization_config(method: str, bits: int, group: int, sym: bool, act_order: bool) -> dict:
    if method == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group,
            "zero_point": True,
            "version": "gemm",
        }
    if method == "gptq":
        return {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group,
            "desc_act": act_order,
            "sym": sym,
            "checkpoint_format": "gptq",
        }
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig(
        config_groups={"group_0": compressed_tensors_scheme(bits, group, sym)},
        format="pack-quantized",
        ignore=["lm_head"],
        quantization_status="compressed",
    )
    return {"quant_method": "compressed-tensors", **config.model_dump(exclude_none=True)}


def write_quantized_checkpoint(
    model,
    out_dir: str,
    method: str,
    bits: int = 4,
    group: int = 32,
    sym: bool = False,
    act_order: bool = False,
    seed: int = 0,
) -> None:
    """Quantize every projection of ``model`` (an fp32 HF causal LM, changed in place to hold
    the decoded weights) into an ``method`` checkpoint in ``out_dir`` (config.json with its
    quantization_config, model.safetensors)."""
    gen = torch.Generator().manual_seed(seed)
    orders: dict[tuple[str, str], torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rpartition(".")[2] not in PROJECTIONS:
                continue
            w = module.weight.detach().float()
            k = w.shape[1]
            size = k if group == -1 else group
            g_idx = torch.arange(k) // size
            if act_order:  # GPTQ: columns quantized in another order, grouped as they came;
                # the order comes from the layer's input, so q/k/v (and gate/up) share it
                parent, _, proj = name.rpartition(".")
                key = (parent, SHARED_INPUT.get(proj, proj))
                if key not in orders:
                    orders[key] = torch.argsort(torch.randperm(k, generator=gen))
                g_idx = g_idx[orders[key]]
            if method == "compressed-tensors":
                packed, decoded = compressed_tensors_tensors(w, bits, group, sym)
            else:
                codes, scales, zeros = group_quantize(w, bits, g_idx, sym)
                decoded = dequantized(codes, scales, zeros, g_idx)
                if method == "awq":
                    packed = awq_tensors(codes, scales, zeros)
                else:
                    packed = gptq_tensors(codes, scales, zeros, bits, g_idx)
            module.weight.copy_(decoded)
            for part, t in packed.items():
                tensors[f"{name}.{part}"] = t.contiguous()
        for name, t in model.state_dict().items():
            module = name.rpartition(".")[0]
            if module.rpartition(".")[2] in PROJECTIONS and name.endswith(".weight"):
                continue
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            tensors[name] = t.detach().clone().contiguous()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(method, bits, group, sym, act_order)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
