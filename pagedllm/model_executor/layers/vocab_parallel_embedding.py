"""The vocabulary split across tensor-parallel ranks: each rank holds ceil(V / N) rows of the
embedding table (the last rank's tail zero-padded), looks up the tokens that fall in its range
and all-reduces; the lm_head computes its rows' logits and rank 0 gathers them for sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed import TensorParallelGroup
from pagedllm.model_executor.layers.linear import Linear


def _padded_rows(vocab_size: int, tp: TensorParallelGroup) -> int:
    return -(-vocab_size // tp.world_size)


def _load_vocab_rows(
    param: nn.Parameter, loaded: torch.Tensor, vocab_size: int, tp: TensorParallelGroup
) -> None:
    if loaded.shape[0] != vocab_size or loaded.shape[1:] != param.shape[1:]:
        raise ValueError(
            f"checkpoint shape {tuple(loaded.shape)} != {(vocab_size, *param.shape[1:])}"
        )
    rows = param.shape[0]
    first = tp.rank * rows
    mine = loaded[first : min(first + rows, vocab_size)]
    param.data.zero_()
    param.data[: mine.shape[0]].copy_(mine)


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallelGroup) -> None:
        super().__init__(_padded_rows(vocab_size, tp), hidden_size)
        self.vocab_size = vocab_size
        self.tp = tp
        self.first = tp.rank * self.num_embeddings

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _load_vocab_rows(param, loaded, self.vocab_size, self.tp)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return super().forward(input_ids)
        local = input_ids - self.first
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(Linear):
    """This rank's vocabulary rows of the output projection (the embedding's rows when tied)."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallelGroup) -> None:
        super().__init__(hidden_size, _padded_rows(vocab_size, tp), bias=False)
        self.vocab_size = vocab_size
        self.tp = tp

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _load_vocab_rows(param, loaded, self.vocab_size, self.tp)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[T, V] on rank 0 (gathered from every rank); None on the others."""
        local = self.forward(hidden)
        if self.tp.world_size == 1:
            return local
        full = self.tp.gather_last_dim(local)
        return None if full is None else full[..., : self.vocab_size]
