"""Linear layers: the weight, and the copies its linear backend prepares once (oneDNN-packed
bf16, an int8 copy for --quantization int8, AMX tiles), or the GGUF blocks it keeps instead
(--quantization gguf); which kernel a step runs is the backend's choice (backends/linear.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.distributed import TensorParallelGroup
from pagedllm.model_executor.backends.base import TORCH_BACKEND
from pagedllm.model_executor.backends.linear import quantize_weight_int8
from pagedllm.model_executor.layers.quant_tensor import QuantTensor, row_segments


class Linear(nn.Linear):
    linear_backend = TORCH_BACKEND.linear  # bound by the model runner (Backend.bind)
    packed_weight: torch.Tensor | None = None  # oneDNN's blocked layout (a bf16 one may be fp32)
    amx_weight: torch.Tensor | None = None  # amx_linear's tile layout
    int8_weight: torch.Tensor | None = None  # [out, in] int8, with int8_scales [out]
    int8_scales: torch.Tensor | None = None
    # --quantization gguf: the weight kept in ggml blocks, as output-row segments of one type
    # each (stacked q|k|v may mix types); quant_shards collects them while loading.
    qweight: tuple[QuantTensor, ...] | None = None
    quant_shards: dict[int, QuantTensor] | None = None
    # Multi-LoRA (model_executor/lora.py): the step's adapters, set on the projections they
    # can change; this layer's name in them.
    lora_step: Any = None
    lora_name: str = ""

    def quantize_int8(self) -> None:
        """Keep a per-output-channel symmetric int8 copy of the weight for small steps."""
        self.int8_weight, self.int8_scales = quantize_weight_int8(self.weight)

    def load_quantized(self, param: nn.Parameter, loaded: QuantTensor, shard: int = 0) -> None:
        """Keep a GGUF weight in its blocks; the dense weight is dropped now, so a model never
        holds both."""
        if param is not self.weight:
            raise ValueError(f"{loaded.name}: a quantized tensor loaded into a bias")
        if self.quant_shards is None:
            self.quant_shards = {}
        self.quant_shards[shard] = loaded
        self.weight.data = self.weight.data.new_empty(0)

    def num_shards(self) -> int:
        return 1

    def pack(self) -> None:
        """Call once the weight is final (loaded, converted)."""
        if self.quant_shards is not None:
            parts = [self.quant_shards.get(i) for i in range(self.num_shards())]
            if None in parts:
                name = next(p.name for p in parts if p is not None)
                raise ValueError(
                    f"{name}: its layer mixes quantized and dense checkpoint tensors;"
                    " --quantization gguf needs all of them quantized"
                )
            self.qweight = tuple(row_segments(parts))
            self.quant_shards = None
        self.linear_backend.prepare(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_backend.apply(self, x)
        if self.lora_step is not None and self.lora_step.layers is not None:
            self.lora_step.apply(self.lora_name, x, y)
        return y


class ColumnParallelLinear(Linear):
    """Output rows of several checkpoint tensors stacked (q/k/v, gate/up), each cut to this
    rank's rows: ``shards[i] = (full_rows, first_row, num_rows)`` of checkpoint tensor i. With
    one rank every shard is whole. No communication: the next layer consumes the local part."""

    def __init__(self, in_features: int, shards: list[tuple[int, int, int]], bias: bool) -> None:
        super().__init__(in_features, sum(rows for _, _, rows in shards), bias=bias)
        self.shards = shards
        self.shard_offsets = [sum(rows for _, _, rows in shards[:i]) for i in range(len(shards))]

    def num_shards(self) -> int:
        return len(self.shards)

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int) -> None:
        full, first, rows = self.shards[shard]
        if loaded.shape[0] != full:
            raise ValueError(f"shard {shard} has {loaded.shape[0]} rows, expected {full}")
        if isinstance(loaded, QuantTensor):
            self.load_quantized(param, loaded.rows(first, rows), shard)
            return
        if param is self.weight and self.quant_shards is not None:
            raise ValueError(
                f"shard {shard}: mixes quantized and dense checkpoint tensors;"
                " --quantization gguf needs all of them quantized"
            )
        start = self.shard_offsets[shard]
        param.data[start : start + rows].copy_(loaded[first : first + rows])


def split_rows(full: int, tp: TensorParallelGroup, what: str) -> tuple[int, int, int]:
    """An even column-parallel split of ``full`` rows: this rank's (full, first, rows)."""
    rows = tp.shard(full, what)
    return full, tp.rank * rows, rows


class RowParallelLinear(Linear):
    """Input columns split across ranks (the output of a column-parallel layer); each rank's
    partial product is summed by one all-reduce. The bias is added once, by rank 0."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup
    ) -> None:
        self.tp = tp
        super().__init__(tp.shard(in_features, "a row-parallel input"), out_features, bias=bias)

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param is self.bias:
            param.data.copy_(loaded if self.tp.is_driver else torch.zeros_like(loaded))
            return
        cols = self.in_features
        if tuple(loaded.shape) != (self.out_features, cols * self.tp.world_size):
            raise ValueError(
                f"checkpoint shape {tuple(loaded.shape)} != "
                f"{(self.out_features, cols * self.tp.world_size)}"
            )
        if isinstance(loaded, QuantTensor):
            self.load_quantized(param, loaded.columns(self.tp.rank * cols, cols))
            return
        param.data.copy_(loaded[:, self.tp.rank * cols : (self.tp.rank + 1) * cols])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


def quantize_linear_weights_int8(model: nn.Module) -> int:
    """Give every Linear an int8 copy of its weight (before packing drops the plain one)."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    for module in linears:
        module.quantize_int8()
    return len(linears)


def pack_linear_weights(model: nn.Module, keep_plain: tuple[nn.Module, ...] = ()) -> int:
    """Pre-pack every Linear's weight and drop the plain copy unless another module shares it
    (a tied lm_head's weight is the embedding table), the module is in ``keep_plain`` or its
    linear backend runs some steps on it. Returns how many were packed."""
    shared = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    shared |= {m.weight.data_ptr() for m in keep_plain}
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack()
            if module.packed_weight is None:
                continue
            count += 1
            read_plain = module.linear_backend.keeps_plain_weight(module)
            if module.weight.data_ptr() not in shared and not read_plain:
                module.weight.data = module.weight.data.new_empty(0)
    return count
