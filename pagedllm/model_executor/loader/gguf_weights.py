"""Stream a GGUF file's tensors as HF-named float32 torch tensors (dequantized, q/k unpermuted),
or with ``keep_quantized`` its quantized matmul weights as QuantTensor blocks (--quantization
gguf)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from pagedllm.model_executor.layers.quant_tensor import (
    KERNEL_TYPES,
    UNQUANTIZED_TYPES,
    QuantTensor,
)
from pagedllm.model_executor.loader.gguf_reader import open_gguf, read_metadata

logger = logging.getLogger(__name__)

# llama.cpp's convert_hf_to_gguf.py interleaves the rows of q/k (rotary halves -> pairs) for these
# architectures only; Qwen2/Qwen3 are written unpermuted.
_PERMUTED_ARCHS = frozenset({"llama"})
SUPPORTED_GGUF_ARCHS = frozenset({"llama", "qwen2", "qwen3", "gemma3"})
# llama.cpp writes Gemma's RMSNorm weights as the factor 1 + w; HF checkpoints hold w.
_NORM_PLUS_ONE_ARCHS = frozenset({"gemma3"})
_GLOBAL_NAMES = MappingProxyType(
    {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
    }
)
_BLOCK_NAMES = MappingProxyType(
    {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
)
# Gemma 3's four norms per layer (ffn_norm is the norm before the MLP there).
_ARCH_BLOCK_NAMES = MappingProxyType(
    {
        "gemma3": MappingProxyType(
            {
                **_BLOCK_NAMES,
                "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm",
            }
        )
    }
)


def iter_gguf_weights(
    path: str, keep_quantized: bool = False
) -> Iterator[tuple[str, torch.Tensor | QuantTensor]]:
    """Yield (hf_name, float32 tensor) for every known tensor, one tensor in memory at a time;
    with ``keep_quantized`` every quantized 2-D weight comes as a QuantTensor instead.

    The file is opened and checked now, so a bad file fails at the call, not at the first tensor
    (and, with ``keep_quantized``, a tensor type no kernel runs fails here too).
    """
    reader = open_gguf(path)
    meta = read_metadata(reader)
    arch = str(meta.get("general.architecture", ""))
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported"
            f" (supported: {', '.join(sorted(SUPPORTED_GGUF_ARCHS))})"
        )
    n_head = meta.get(f"{arch}.attention.head_count")
    n_head_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
    if keep_quantized:
        _check_kernel_types(path, reader, arch)
    return _generate(path, reader, arch, n_head, n_head_kv, keep_quantized)


def _kept_quantized(tensor: ReaderTensor) -> bool:
    """Matmul weights stay as stored: quantized ones, and unquantized ones whose rows the kernel
    takes (so a layer stacking q|k|v is all blocks); norms and odd widths come decoded."""
    if len(tensor.shape) != 2:
        return False
    return tensor.tensor_type not in UNQUANTIZED_TYPES or int(tensor.shape[0]) % 32 == 0


def _check_kernel_types(path: str, reader: GGUFReader, arch: str) -> None:
    for tensor in reader.tensors:
        if (
            hf_tensor_name(tensor.name, arch) is not None
            and _kept_quantized(tensor)
            and tensor.tensor_type not in KERNEL_TYPES
        ):
            runs = ", ".join(sorted(t.name for t in KERNEL_TYPES))
            raise ValueError(
                f"{path}: tensor {tensor.name} has GGML type {tensor.tensor_type.name}, which"
                f" --quantization gguf cannot run (it runs {runs}); load the file without"
                " --quantization to dequantize it"
            )


def _generate(
    path: str, reader: GGUFReader, arch: str, n_head: Any, n_head_kv: Any, keep_quantized: bool
) -> Iterator[tuple[str, torch.Tensor | QuantTensor]]:
    permuted = arch in _PERMUTED_ARCHS
    for tensor in reader.tensors:
        hf_name = hf_tensor_name(tensor.name, arch)
        if hf_name is None:
            logger.debug("%s: skipping GGUF tensor %s (not an HF parameter)", path, tensor.name)
            continue
        if keep_quantized and _kept_quantized(tensor):
            # A copy (the file is only mapped), as bytes whatever gguf-py's element type.
            blocks = np.array(tensor.data).view(np.uint8).reshape(int(tensor.shape[1]), -1)
            if permuted:
                blocks = _hf_row_order(blocks, tensor.name, n_head, n_head_kv, path)
            qtype = GGMLQuantizationType(int(tensor.tensor_type))
            yield (
                hf_name,
                QuantTensor(qtype, torch.from_numpy(blocks), int(tensor.shape[0]), tensor.name),
            )
            continue
        weights = _dequantize(path, tensor)
        if arch in _NORM_PLUS_ONE_ARCHS and hf_name.endswith("norm.weight"):
            weights -= 1.0
        if permuted:
            weights = _hf_row_order(weights, tensor.name, n_head, n_head_kv, path)
        yield hf_name, torch.from_numpy(weights)


def _hf_row_order(rows: np.ndarray, name: str, n_head: Any, n_head_kv: Any, path: str):
    """q/k rows (values or whole rows of blocks) back in HF order; other tensors as they are."""
    if ".attn_q." not in name and ".attn_k." not in name:
        return rows
    layer = int(name.split(".")[1])
    heads = n_head if ".attn_q." in name else n_head_kv
    return unpermute_qk(rows, _per_layer(heads, layer, path, name))


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """HF parameter name of a llama.cpp tensor name (of an ``arch`` model), or None for tensors
    HF models do not have."""
    block_names = _ARCH_BLOCK_NAMES.get(arch, _BLOCK_NAMES)
    stem, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in block_names:
        return f"model.layers.{parts[1]}.{block_names[parts[2]]}.{kind}"
    return None


def unpermute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation; exactly transformers' LlamaTensorProcessor."""
    rows = weights.shape[0]
    w = weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:])
    return np.ascontiguousarray(w.swapaxes(2, 1).reshape(weights.shape))


def _dequantize(path: str, tensor: ReaderTensor) -> np.ndarray:
    """Dequantize one ReaderTensor into a writable float32 array of HF shape (rows, cols)."""
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise ValueError(
            f"{path}: tensor {tensor.name} has GGML type {tensor.tensor_type.name},"
            " which cannot be dequantized"
        ) from err
    shape = tuple(reversed([int(dim) for dim in tensor.shape]))
    values = values.reshape(shape)
    if values.dtype != np.float32:
        values = values.astype(np.float32)
    elif np.may_share_memory(values, tensor.data):
        # F32 tensors come back as views of the read-only memory map: copy before torch owns them.
        values = values.copy()
    return values


def _per_layer(value: Any, layer: int, path: str, name: str) -> int:
    """Head counts are ints, or per-layer arrays in some GGUFs."""
    if isinstance(value, list):
        value = value[layer]
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{path}: no valid attention head count to unpermute {name}")
    return value
