"""The vocabulary split across tensor-parallel ranks: each rank holds ceil(V / N) rows of the
embedding table (the last rank's tail zero-padded), looks up the tokens that fall in its range
and all-reduces; the lm_head computes its rows' logits and rank 0 gathers them for sampling.
Under --quantization gguf the table stays in its blocks; looked-up rows are decoded, and a tied
lm_head multiplies by the same blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed import TensorParallelGroup
from pagedllm.model_executor.backends.base import TORCH_BACKEND
from pagedllm.model_executor.layers.linear import Linear
from pagedllm.model_executor.layers.quant_tensor import QuantTensor
from pagedllm.model_executor.malloc_tuning import MMAP_THRESHOLD_BYTES


def _padded_rows(vocab_size: int, tp: TensorParallelGroup) -> int:
    return -(-vocab_size // tp.world_size)


def _check_vocab_shape(loaded, vocab_size: int, hidden_size: int) -> None:
    if tuple(loaded.shape) != (vocab_size, hidden_size):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != {(vocab_size, hidden_size)}")


def _quantized_vocab_rows(loaded: QuantTensor, rows: int, tp: TensorParallelGroup) -> QuantTensor:
    first = tp.rank * rows
    return loaded.rows(first, max(0, min(rows, loaded.shape[0] - first))).padded_rows(rows)


def _load_vocab_rows(
    param: nn.Parameter, loaded: torch.Tensor, vocab_size: int, tp: TensorParallelGroup
) -> None:
    _check_vocab_shape(loaded, vocab_size, param.shape[1])
    rows = param.shape[0]
    first = tp.rank * rows
    mine = loaded[first : min(first + rows, vocab_size)]
    param.data.zero_()
    param.data[: mine.shape[0]].copy_(mine)


class VocabParallelEmbedding(nn.Embedding):
    linear_backend = TORCH_BACKEND.linear  # bound by the model runner: decodes quantized rows
    qweight: QuantTensor | None = None  # --quantization gguf: this rank's rows, in blocks

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallelGroup) -> None:
        super().__init__(_padded_rows(vocab_size, tp), hidden_size)
        self.vocab_size = vocab_size
        self.tp = tp
        self.first = tp.rank * self.num_embeddings

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if isinstance(loaded, QuantTensor):
            _check_vocab_shape(loaded, self.vocab_size, self.embedding_dim)
            self.qweight = _quantized_vocab_rows(loaded, self.num_embeddings, self.tp)
            param.data = param.data.new_empty(0)
            return
        _load_vocab_rows(param, loaded, self.vocab_size, self.tp)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.qweight is None:
            return F.embedding(ids, self.weight)
        return self.linear_backend.quantized_rows(self.qweight, ids, self.weight.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.first
        outside = (local < 0) | (local >= self.num_embeddings)
        out = self._lookup(local.masked_fill(outside, 0))
        return self.tp.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(Linear):
    """This rank's vocabulary rows of the output projection (the embedding's rows when tied)."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallelGroup) -> None:
        super().__init__(hidden_size, _padded_rows(vocab_size, tp), bias=False)
        self.vocab_size = vocab_size
        self.tp = tp
        self._logits_buffer: torch.Tensor | None = None  # see _local_logits

    # The embedding whose table this layer multiplies by (a tuple: not a registered submodule).
    tied_to: tuple[VocabParallelEmbedding, ...] = ()

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """tie_word_embeddings: the embedding table is this layer's weight (dense or quantized)."""
        self.weight = embedding.weight
        self.tied_to = (embedding,)

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if isinstance(loaded, QuantTensor):
            _check_vocab_shape(loaded, self.vocab_size, self.in_features)
            self.load_quantized(param, _quantized_vocab_rows(loaded, self.out_features, self.tp))
            return
        _load_vocab_rows(param, loaded, self.vocab_size, self.tp)

    def pack(self) -> None:
        if self.tied_to and self.tied_to[0].qweight is not None:
            self.quant_shards = {0: self.tied_to[0].qweight}
        super().pack()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[T, V] on rank 0 (gathered from every rank); None on the others. The tensor may be
        this layer's buffer, overwritten by the next call: consume it within the step."""
        local = self._local_logits(hidden)
        if self.tp.world_size == 1:
            return local
        full = self.tp.gather_last_dim(local)
        return None if full is None else full[..., : self.vocab_size]

    def _local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's logits. A [T, V] result past glibc's mmap threshold would be a fresh
        mapping every step, page-faulted in by the GEMM writing it (431 rows x 49,152 bf16,
        42 MB: 37 ms a call against 33 ms in row chunks copied into a kept buffer, on Zen 5);
        so large results are computed in chunks under the threshold and copied into a buffer
        kept between steps (grown to the most rows seen)."""
        chunk = max(1, MMAP_THRESHOLD_BYTES // 2 // (self.out_features * hidden.element_size()))
        rows = hidden.shape[0]
        if rows <= chunk or hidden.device.type != "cpu" or self.lora_step is not None:
            return self.forward(hidden)
        first = self.forward(hidden[:chunk])
        buf = self._logits_buffer
        if buf is None or buf.shape[0] < rows or buf.dtype != first.dtype:
            buf = self._logits_buffer = first.new_empty(rows, first.shape[1])
        out = buf[:rows]
        out[:chunk].copy_(first)
        for start in range(chunk, rows, chunk):
            out[start : start + chunk].copy_(self.forward(hidden[start : start + chunk]))
        return out
