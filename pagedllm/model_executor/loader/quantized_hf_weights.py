"""Quantized HF checkpoints (AWQ, GPTQ, compressed-tensors), as ``vllm serve`` takes them: the
method comes from config.json's ``quantization_config``, and each quantized Linear's packed
tensors (qweight/qzeros/scales/g_idx, or weight_packed/weight_scale/weight_zero_point/
weight_g_idx) are unpacked to codes, scales and zero points and repacked as one QuantTensor of
affine groups (layers/quant_tensor.py) under the layer's ``.weight`` name. The codes stay
4 or 8 bits; nothing is dequantized.

Formats, as their own code defines them:
- AWQ (GEMM): qweight int32 [K, N/8], eight 4-bit codes of consecutive outputs per word in
  the order 0 2 4 6 1 3 5 7; qzeros likewise [K/G, N/8]; scales [K/G, N]; w = (q - z) s.
- GPTQ: qweight int32 [K/(32/b), N], codes of consecutive inputs from the low bits; qzeros
  [groups, N/(32/b)] packed along outputs, stored minus one in the original ("gptq", v1)
  format; scales [groups, N]; g_idx [K] (each input's group: not in order with desc_act).
- compressed-tensors pack-quantized: weight_packed int32 [N, K b/32], codes of consecutive
  inputs from the low bits, signed values stored plus 2^(b-1); weight_scale [N, groups];
  weight_zero_point (asymmetric) packed the same way along outputs; weight_g_idx (actorder).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from pagedllm.model_executor.layers.quant_tensor import QuantTensor, affine_tensor

QUANT_METHODS = ("awq", "gptq", "compressed-tensors")


@dataclass(frozen=True)
class WeightScheme:
    """How one layer's weight is quantized."""

    bits: int
    group_size: int  # -1: one group per output channel
    zero_point: bool  # asymmetric (zero points stored)
    act_order: bool = False  # g_idx puts inputs in groups out of order


@dataclass(frozen=True)
class CheckpointQuantization:
    method: str
    scheme: WeightScheme  # the default scheme (AWQ/GPTQ: every quantized layer's)
    gptq_v1_zeros: bool = False  # GPTQ "gptq" format: zero points stored minus one
    # compressed-tensors: (targets, scheme) per config group, and the layers left dense.
    groups: tuple[tuple[tuple[str, ...], WeightScheme], ...] = ()
    ignore: tuple[str, ...] = ()

    def scheme_for(self, module: str) -> WeightScheme | None:
        """The scheme a layer's weight was quantized with, None if left dense."""
        if self.method != "compressed-tensors":
            return self.scheme
        if any(_matches(pattern, module) for pattern in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(t == "Linear" or _matches(t, module) for t in targets):
                return scheme
        return None


def _matches(pattern: str, module: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return module == pattern or module.endswith("." + pattern)


def read_quantization_config(model_dir: str) -> dict | None:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("quantization_config") or None


def parse_quantization_config(qconfig: dict, where: str) -> CheckpointQuantization:
    """The checkpoint's quantization, or a ValueError naming what pagedllm cannot run."""
    method = str(qconfig.get("quant_method", "unknown")).lower()
    if method == "awq":
        return _parse_awq(qconfig, where)
    if method == "gptq":
        return _parse_gptq(qconfig, where)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(qconfig, where)
    raise ValueError(
        f"{where}: quantization_config with quant_method {method!r} is not supported"
        f" (pagedllm runs {', '.join(QUANT_METHODS)} checkpoints, unquantized ones and GGUF files)"
    )


def _unsupported(where: str, method: str, what: str) -> ValueError:
    return ValueError(f"{where}: {method} checkpoint with {what} is not supported")


def _check_group(where: str, method: str, group: int) -> None:
    if group != -1 and (group <= 0 or group % 32):
        raise _unsupported(
            where, method, f"group_size {group} (groups of a multiple of 32 weights, or -1, run)"
        )


def _parse_awq(q: dict, where: str) -> CheckpointQuantization:
    bits, group = (
        int(q.get("bits", q.get("w_bit", 4))),
        int(q.get("group_size", q.get("q_group_size", 128))),
    )
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise _unsupported(where, "AWQ", f"version {version!r} (the GEMM packing runs)")
    if bits != 4:
        raise _unsupported(where, "AWQ", f"bits={bits} (4 runs)")
    if not q.get("zero_point", True):
        raise _unsupported(where, "AWQ", "zero_point=false (AWQ's zero-point packing runs)")
    _check_group(where, "AWQ", group)
    return CheckpointQuantization("awq", WeightScheme(4, group, True))


def _parse_gptq(q: dict, where: str) -> CheckpointQuantization:
    bits, group = int(q.get("bits", 4)), int(q.get("group_size", 128))
    if bits not in (4, 8):
        raise _unsupported(where, "GPTQ", f"bits={bits} (4 and 8 run)")
    _check_group(where, "GPTQ", group)
    fmt = str(q.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise _unsupported(where, "GPTQ", f"checkpoint_format {fmt!r} (gptq and gptq_v2 run)")
    scheme = WeightScheme(bits, group, True, bool(q.get("desc_act", False)))
    return CheckpointQuantization("gptq", scheme, gptq_v1_zeros=fmt == "gptq")


def _parse_compressed_tensors(q: dict, where: str) -> CheckpointQuantization:
    method = "compressed-tensors"
    groups = []
    for name, group in (q.get("config_groups") or {}).items():
        fmt = group.get("format") or q.get("format")
        if fmt != "pack-quantized":
            raise _unsupported(where, method, f"format {fmt!r} in {name} (pack-quantized runs)")
        if group.get("input_activations") or group.get("output_activations"):
            raise _unsupported(
                where, method, f"activation quantization in {name} (weight-only schemes run)"
            )
        w = group.get("weights") or {}
        bits, kind = int(w.get("num_bits", 0)), w.get("type", "int")
        strategy = w.get("strategy")
        if kind != "int" or bits not in (4, 8):
            raise _unsupported(
                where, method, f"{bits}-bit {kind} weights in {name} (int4, int8 run)"
            )
        if strategy == "channel":
            size = -1
        elif strategy == "group":
            size = int(w.get("group_size") or 0)
            _check_group(where, method, size)
        else:
            raise _unsupported(
                where, method, f"strategy {strategy!r} in {name} (group, channel run)"
            )
        actorder = w.get("actorder")
        if actorder not in (None, "group", "weight", "static", False):
            raise _unsupported(where, method, f"actorder {actorder!r} in {name}")
        scheme = WeightScheme(bits, size, not w.get("symmetric", True), actorder == "group")
        groups.append((tuple(group.get("targets") or ("Linear",)), scheme))
    if not groups:
        raise _unsupported(where, method, "no config_groups")
    return CheckpointQuantization(
        method, groups[0][1], groups=tuple(groups), ignore=tuple(q.get("ignore") or ())
    )


# ---- unpacking --------------------------------------------------------------------------------
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output c * 8 + _AWQ_ORDER[i] sits in nibble i


def _unpack_bits(packed: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """int32 words holding 32 / bits codes each (from the low bits) -> uint8 codes, the
    codes of a word becoming consecutive along ``dim``."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    words = packed.to(torch.int32).unsqueeze(-1)
    codes = ((words >> shifts) & ((1 << bits) - 1)).to(torch.uint8)  # [..., per]
    if order is not None:
        codes = codes[..., torch.tensor([order.index(j) for j in range(per)])]
    if dim == 1:
        return codes.reshape(packed.shape[0], -1)
    return codes.permute(0, 2, 1).reshape(-1, packed.shape[1])


def _with_parts(parts: dict[str, torch.Tensor], name: str, *keys: str) -> list[torch.Tensor]:
    missing = [k for k in keys if k not in parts]
    if missing:
        raise ValueError(f"{name}: the checkpoint lacks its {', '.join(missing)}")
    return [parts[k] for k in keys]


def _affine(codes, scales, zeros, bits, name, g_idx=None) -> QuantTensor:
    """codes [N, K] with per-group scales/zeros [N, groups] (group of input k: g_idx[k], else
    k // (K / groups))."""
    n, k = codes.shape
    scales = scales.float()
    if scales.dim() != 2 or scales.shape[0] != n or zeros.shape != scales.shape:
        raise ValueError(
            f"{name}: scales {tuple(scales.shape)} / zero points {tuple(zeros.shape)}"
            f" do not fit weights [{n}, {k}]"
        )
    perm = None
    if g_idx is not None:
        g_idx = g_idx.long()
        groups = scales.shape[1]
        size = k // groups
        if g_idx.shape != (k,) or g_idx.min() < 0 or g_idx.max() >= groups:
            raise ValueError(f"{name}: g_idx {tuple(g_idx.shape)} does not index {groups} groups")
        if not torch.equal(g_idx, torch.arange(k) // size):
            if not torch.equal(
                torch.bincount(g_idx, minlength=groups), torch.full((groups,), size)
            ):
                raise ValueError(f"{name}: g_idx gives groups of unequal sizes")
            perm = torch.argsort(g_idx, stable=True)
            codes = codes[:, perm]
    return affine_tensor(codes, scales, -zeros.float() * scales, bits, name, perm)


def _awq_tensor(parts: dict[str, torch.Tensor], name: str) -> QuantTensor:
    qweight, qzeros, scales = _with_parts(parts, name, "qweight", "qzeros", "scales")
    codes = _unpack_bits(qweight, 4, 1, _AWQ_ORDER)  # [K, N]
    zeros = _unpack_bits(qzeros, 4, 1, _AWQ_ORDER)  # [K/G, N]
    if scales.shape != zeros.shape or codes.shape[1] != scales.shape[1]:
        raise ValueError(
            f"{name}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales"
            f" {tuple(scales.shape)} do not fit one AWQ layer"
        )
    return _affine(codes.t().contiguous(), scales.t(), zeros.t(), 4, name)


def _gptq_tensor(
    parts: dict[str, torch.Tensor], name: str, q: CheckpointQuantization, scheme: WeightScheme
) -> QuantTensor:
    qweight, qzeros, scales = _with_parts(parts, name, "qweight", "qzeros", "scales")
    bits = scheme.bits
    codes = _unpack_bits(qweight, bits, 0)  # [K, N]
    zeros = _unpack_bits(qzeros, bits, 1)[:, : scales.shape[1]].float()  # [groups, N]
    if q.gptq_v1_zeros:
        zeros = zeros + 1
    if zeros.shape != scales.shape or codes.shape[1] != scales.shape[1]:
        raise ValueError(
            f"{name}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales"
            f" {tuple(scales.shape)} do not fit one GPTQ layer"
        )
    g_idx = parts["g_idx"] if scheme.act_order else None
    return _affine(codes.t().contiguous(), scales.t(), zeros.t(), bits, name, g_idx)


def _compressed_tensor(
    parts: dict[str, torch.Tensor], name: str, scheme: WeightScheme
) -> QuantTensor:
    packed, scales = parts["weight_packed"], parts["weight_scale"]
    n, k = (int(v) for v in parts["weight_shape"].tolist())
    bits, offset = scheme.bits, 1 << (scheme.bits - 1)
    codes = _unpack_bits(packed, bits, 1)[:, :k]
    if codes.shape != (n, k):
        raise ValueError(f"{name}: weight_packed {tuple(packed.shape)} does not hold [{n}, {k}]")
    zeros = torch.full(scales.shape, float(offset))
    if scheme.zero_point:  # (_affine checks its shape against the scales')
        zeros = _unpack_bits(parts["weight_zero_point"], bits, 0)[:n].float()
    return _affine(codes, scales, zeros, bits, name, parts.get("weight_g_idx"))


def iter_quantized_hf_weights(
    tensors: Iterable[tuple[str, torch.Tensor]], q: CheckpointQuantization
) -> Iterator[tuple[str, torch.Tensor | QuantTensor]]:
    """The checkpoint's tensors, each quantized layer's parts gathered (they may sit in
    different shard files) into one ``<layer>.weight`` QuantTensor; other tensors as stored."""
    suffixes = {
        "awq": ("qweight", "qzeros", "scales"),
        "gptq": ("qweight", "qzeros", "scales", "g_idx"),
        "compressed-tensors": (
            "weight_packed",
            "weight_scale",
            "weight_zero_point",
            "weight_shape",
            "weight_g_idx",
        ),
    }[q.method]
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        module, _, part = name.rpartition(".")
        if part not in suffixes:
            yield name, tensor
            continue
        scheme = q.scheme_for(module)
        if scheme is None:
            raise ValueError(f"{name}: a quantized tensor in a layer the config leaves dense")
        if part == "g_idx" and not scheme.act_order:
            continue  # in order (desc_act false): each group is k // group_size
        parts = pending.setdefault(module, {})
        parts[part] = tensor
        if _complete(parts, q, scheme):
            yield f"{module}.weight", _convert(pending.pop(module), module, q, scheme)
    for module, parts in pending.items():
        scheme = q.scheme_for(module)
        _convert(parts, module, q, scheme)  # raises, naming what is missing
        raise ValueError(f"{module}: the checkpoint's quantized tensors are incomplete")


def _required_parts(method: str, scheme: WeightScheme) -> tuple[str, ...]:
    """The tensors a quantized layer needs before it can be converted."""
    if method == "awq":
        return ("qweight", "qzeros", "scales")
    if method == "gptq":
        return ("qweight", "qzeros", "scales") + (("g_idx",) if scheme.act_order else ())
    need = ("weight_packed", "weight_scale", "weight_shape")
    need += ("weight_zero_point",) if scheme.zero_point else ()
    return need + (("weight_g_idx",) if scheme.act_order else ())


def _complete(parts: dict, q: CheckpointQuantization, scheme: WeightScheme) -> bool:
    return all(k in parts for k in _required_parts(q.method, scheme))


def _convert(parts, module: str, q: CheckpointQuantization, scheme: WeightScheme) -> QuantTensor:
    name = f"{module}.weight"
    _with_parts(parts, name, *_required_parts(q.method, scheme))  # raises, naming the missing
    if q.method == "awq":
        tensor = _awq_tensor(parts, name)
    elif q.method == "gptq":
        tensor = _gptq_tensor(parts, name, q, scheme)
    else:
        tensor = _compressed_tensor(parts, name, scheme)
    # The scales must be the config's groups: another count means another quantization.
    cols = tensor.cols
    group = cols if scheme.group_size == -1 else scheme.group_size
    groups = parts.get("scales", parts.get("weight_scale"))
    found = groups.shape[0 if q.method in ("awq", "gptq") else 1]
    if cols % group or found != cols // group:
        raise ValueError(
            f"{name}: {found} scale groups for {cols} inputs, but the config says groups of"
            f" {scheme.group_size}"
        )
    return tensor
