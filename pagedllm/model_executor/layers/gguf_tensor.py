"""GGUFTensor: a 2-D weight kept in llama.cpp's quantized blocks (``--quantization gguf``), as
the loader reads it from the file; the layers slice it by rows (stacked and column-parallel
outputs, vocabulary shards) and by block columns (row-parallel inputs) without decoding it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

# The formats the native kernel decodes (ops/csrc/generic/gguf_linear.cpp); it takes the
# unquantized ones in rows of whole 32-weight runs.
UNQUANTIZED_TYPES = frozenset(
    {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
)
KERNEL_TYPES = UNQUANTIZED_TYPES | frozenset(
    {
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        GGMLQuantizationType.Q5_0,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q6_K,
    }
)


@dataclass(frozen=True)
class GGUFTensor:
    """``data``: uint8 [rows, row_bytes], each row ``cols`` weights in ggml blocks of ``qtype``."""

    qtype: GGMLQuantizationType
    data: torch.Tensor
    cols: int
    name: str = ""  # the GGUF tensor it came from, for errors

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.cols)

    def rows(self, first: int, count: int) -> GGUFTensor:
        return GGUFTensor(self.qtype, self.data[first : first + count], self.cols, self.name)

    def rows_at(self, ids: torch.Tensor) -> GGUFTensor:
        """The rows ``ids`` (any order, repeats allowed): an embedding lookup."""
        return GGUFTensor(self.qtype, self.data[ids.cpu()], self.cols, self.name)

    def columns(self, first: int, count: int) -> GGUFTensor:
        """Weights [first, first + count) of every row; both must fall on block boundaries."""
        bw, bb = GGML_QUANT_SIZES[self.qtype]
        if first % bw or count % bw:
            raise ValueError(
                f"{self.name or 'GGUF tensor'}: columns {first}..{first + count} do not fall on"
                f" its {self.qtype.name} blocks of {bw} weights (a tensor-parallel split must)"
            )
        data = self.data[:, first // bw * bb : (first + count) // bw * bb]
        return GGUFTensor(self.qtype, data, count, self.name)

    def padded_rows(self, rows: int) -> GGUFTensor:
        """Zero rows appended up to ``rows`` (zero bytes decode to zero weights: every scale
        is 0)."""
        pad = rows - self.data.shape[0]
        if pad <= 0:
            return self
        data = torch.cat([self.data, self.data.new_zeros(pad, self.data.shape[1])])
        return GGUFTensor(self.qtype, data, self.cols, self.name)

    def dequantize(self) -> torch.Tensor:
        """fp32 [rows, cols] by gguf-py's reference decoder."""
        values = dequantize(self.data.numpy(), self.qtype).reshape(self.shape)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def concat_rows(parts: list[GGUFTensor]) -> GGUFTensor:
    first = parts[0]
    if len(parts) == 1:
        return GGUFTensor(first.qtype, first.data.contiguous(), first.cols, first.name)
    return GGUFTensor(first.qtype, torch.cat([p.data for p in parts]), first.cols, first.name)


def row_segments(parts: list[GGUFTensor]) -> list[GGUFTensor]:
    """Stacked outputs (q|k|v, gate|up) as few tensors as their types allow: consecutive parts
    of one type are joined (a Q4_K_M file mixes Q5_0 and Q8_0 within one layer's q/k/v)."""
    runs: list[list[GGUFTensor]] = []
    for part in parts:
        if runs and runs[-1][0].qtype == part.qtype:
            runs[-1].append(part)
        else:
            runs.append([part])
    return [concat_rows(run) for run in runs]
