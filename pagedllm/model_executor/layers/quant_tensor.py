"""QuantTensor: a 2-D weight kept quantized, in rows of blocks the native kernel decodes
(ops/csrc/generic/quant_linear.cpp): llama.cpp's blocks as a GGUF file stores them
(``--quantization gguf``), or affine groups repacked at load from an AWQ, GPTQ or
compressed-tensors checkpoint. The layers slice it by rows (stacked and column-parallel outputs,
vocabulary shards) and by block columns (row-parallel inputs) without decoding it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

# The GGUF formats the native kernel decodes; it takes the unquantized ones in rows of whole
# 32-weight runs.
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


class AffineType(IntEnum):
    """Affine groups (the kernel's ids: bits * 1000 + group): G weights of 4 or 8 unsigned bits q
    sharing an fp32 scale s and offset o, w = q s + o. A block is s, o, then the codes: 4-bit as
    16 bytes per 32 weights (weight j in the low nibble of byte j, j + 16 in the high one, as
    ggml's Q4 blocks), 8-bit one byte each."""

    A4G32 = 4032
    A4G64 = 4064
    A4G128 = 4128
    A8G32 = 8032
    A8G64 = 8064
    A8G128 = 8128

    @property
    def bits(self) -> int:
        return self.value // 1000

    @property
    def group(self) -> int:
        return self.value % 1000


AFFINE_GROUPS = (128, 64, 32)


def is_affine(qtype: int) -> bool:
    return qtype in AffineType._value2member_map_


def block_size(qtype: int) -> tuple[int, int]:
    """(weights, bytes) of one block."""
    if is_affine(qtype):
        t = AffineType(qtype)
        return t.group, 8 + t.group * t.bits // 8
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]


def qtype_name(qtype: int) -> str:
    if is_affine(qtype):
        return AffineType(qtype).name
    return GGMLQuantizationType(qtype).name


@dataclass(frozen=True)
class QuantTensor:
    """``data``: uint8 [rows, row_bytes], each row ``cols`` weights in blocks of ``qtype`` (a
    GGMLQuantizationType or an AffineType). ``perm`` (GPTQ's act order): the blocks hold the
    input columns in this order (column j of the blocks is input ``perm[j]``), so that each
    group's columns are adjacent; x is gathered the same way before the matmul."""

    qtype: int
    data: torch.Tensor
    cols: int
    name: str = ""  # the checkpoint tensor it came from, for errors
    perm: torch.Tensor | None = None

    def like(self, data: torch.Tensor, cols: int | None = None) -> QuantTensor:
        return QuantTensor(
            self.qtype, data, self.cols if cols is None else cols, self.name, self.perm
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.cols)

    def rows(self, first: int, count: int) -> QuantTensor:
        return self.like(self.data[first : first + count])

    def rows_at(self, ids: torch.Tensor) -> QuantTensor:
        """The rows ``ids`` (any order, repeats allowed): an embedding lookup."""
        return self.like(self.data[ids.cpu()])

    def columns(self, first: int, count: int) -> QuantTensor:
        """Weights [first, first + count) of every row; both must fall on block boundaries."""
        if first == 0 and count == self.cols:
            return self
        bw, bb = block_size(self.qtype)
        what = self.name or "quantized tensor"
        if self.perm is not None:
            raise ValueError(
                f"{what}: GPTQ act order (desc_act) spreads each group over the input columns,"
                " so it cannot be split by input columns across tensor-parallel ranks"
            )
        if (first % bw or count % bw) and is_affine(self.qtype):
            # Affine groups split losslessly into smaller ones, each keeping the scale and
            # offset: re-block at a size the split falls on (whole 32-weight runs).
            group = next(
                (g for g in AFFINE_GROUPS if bw % g == 0 and first % g == count % g == 0), 0
            )
            if group:
                return _reblocked(self, group).columns(first, count)
        if first % bw or count % bw:
            raise ValueError(
                f"{what}: columns {first}..{first + count} do not fall on its"
                f" {qtype_name(self.qtype)} blocks of {bw} weights (a tensor-parallel split must)"
            )
        return self.like(self.data[:, first // bw * bb : (first + count) // bw * bb], count)

    def padded_rows(self, rows: int) -> QuantTensor:
        """Zero rows appended up to ``rows`` (zero bytes decode to zero weights: every scale
        is 0)."""
        pad = rows - self.data.shape[0]
        if pad <= 0:
            return self
        return self.like(torch.cat([self.data, self.data.new_zeros(pad, self.data.shape[1])]))

    def dequantize(self) -> torch.Tensor:
        """fp32 [rows, cols] in the input columns' own order, decoded in Python (gguf-py's
        reference decoder for GGUF blocks), independently of the kernel."""
        if is_affine(self.qtype):
            values = _affine_values(self)
        else:
            blocks = dequantize(self.data.numpy(), GGMLQuantizationType(self.qtype))
            values = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.float32))
        return self.in_input_order(values.reshape(self.shape))

    def in_input_order(self, values: torch.Tensor) -> torch.Tensor:
        """Decoded rows [n, cols], their columns put back in the inputs' order (act order)."""
        if self.perm is None:
            return values
        out = torch.empty_like(values)
        out[:, self.perm] = values
        return out


def affine_tensor(
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    name: str,
    perm: torch.Tensor | None = None,
    kernel_group: int | None = None,
) -> QuantTensor:
    """Affine blocks from unsigned codes [N, K] (uint8, < 2**bits) and fp32 scales/offsets
    [N, K / G] (w = q s + o). A group size the kernel lacks (per-channel: G = K) is laid out in
    the largest kernel group that divides it (or ``kernel_group``), its scale repeated."""
    n, k = codes.shape
    groups = scales.shape[1]
    if bits not in (4, 8):
        raise ValueError(f"{name}: {bits}-bit weights have no kernel (4 and 8 bits do)")
    if groups == 0 or k % groups or scales.shape != (n, groups) or offsets.shape != (n, groups):
        raise ValueError(f"{name}: scales {tuple(scales.shape)} do not fit weights [{n}, {k}]")
    group = k // groups
    if kernel_group is None:
        kernel_group = next((g for g in AFFINE_GROUPS if group % g == 0), None)
    if kernel_group is None or group % kernel_group:
        raise ValueError(
            f"{name}: group size {group} is not a multiple of 32 (the kernel takes groups of"
            f" {', '.join(map(str, AFFINE_GROUPS))} and their multiples)"
        )
    repeat = group // kernel_group
    scales = scales.float().repeat_interleave(repeat, dim=1)
    offsets = offsets.float().repeat_interleave(repeat, dim=1)
    blocks = k // kernel_group
    q = codes.to(torch.uint8).reshape(n, blocks, kernel_group)
    if bits == 4:
        # Each 32 weights: byte j holds weight j (low nibble) and j + 16 (high nibble).
        sub = q.reshape(n, blocks, kernel_group // 32, 2, 16)
        q = (sub[..., 0, :] | (sub[..., 1, :] << 4)).reshape(n, blocks, kernel_group // 2)
    header = torch.stack([scales, offsets], dim=-1).contiguous().view(torch.uint8)
    data = torch.cat([header.reshape(n, blocks, 8), q], dim=-1).reshape(n, -1)
    qtype = AffineType(bits * 1000 + kernel_group)
    return QuantTensor(int(qtype), data.contiguous(), k, name, perm)


def _affine_parts(t: QuantTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [n, blocks, G], scales, offsets fp32 [n, blocks])."""
    qtype = AffineType(t.qtype)
    n = t.data.shape[0]
    blocks = t.data.reshape(n, -1, block_size(qtype)[1])
    header = blocks[..., :8].contiguous().view(torch.float32)  # [n, blocks, 2]
    q = blocks[..., 8:]
    if qtype.bits == 4:
        sub = q.reshape(n, q.shape[1], -1, 16)
        q = torch.stack([sub & 15, sub >> 4], dim=-2).reshape(n, q.shape[1], qtype.group)
    return q, header[..., 0], header[..., 1]


def _affine_values(t: QuantTensor) -> torch.Tensor:
    q, scales, offsets = _affine_parts(t)
    return q.float() * scales[..., None] + offsets[..., None]


def _reblocked(t: QuantTensor, group: int) -> QuantTensor:
    q, scales, offsets = _affine_parts(t)
    n = q.shape[0]
    bits = AffineType(t.qtype).bits
    return affine_tensor(q.reshape(n, -1), scales, offsets, bits, t.name, t.perm, group)


def concat_rows(parts: list[QuantTensor]) -> QuantTensor:
    first = parts[0]
    if len(parts) == 1:
        return first.like(first.data.contiguous())
    return first.like(torch.cat([p.data for p in parts]))


def row_segments(parts: list[QuantTensor]) -> list[QuantTensor]:
    """Stacked outputs (q|k|v, gate|up) as few tensors as their types allow: consecutive parts
    of one type (and input order) are joined (a Q4_K_M file mixes Q5_0 and Q8_0 within one
    layer's q/k/v; GPTQ's act order gives each checkpoint tensor its own)."""
    runs: list[list[QuantTensor]] = []
    for part in parts:
        if runs and runs[-1][0].qtype == part.qtype and _same_perm(runs[-1][0].perm, part.perm):
            runs[-1].append(part)
        else:
            runs.append([part])
    return [concat_rows(run) for run in runs]


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or torch.equal(a, b)
