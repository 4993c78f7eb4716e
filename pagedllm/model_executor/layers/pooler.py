"""Pooler: one vector per prompt from its final hidden states (the embedding), as
sentence-transformers' Pooling + Normalize modules do: mean over the prompt's tokens, its first
([CLS]) token, or its last token; then, per request, Matryoshka truncation to ``dimensions``
and L2 normalization."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.config import PoolerConfig
from pagedllm.pooling_params import PoolingParams


class Pooler:
    def __init__(self, config: PoolerConfig) -> None:
        self.config = config

    @property
    def needs_whole_prompt(self) -> bool:
        """MEAN and CLS read every (or the first) token's hidden state: the prompt must run in
        one step from its first token (no chunking, no prefix-cache hit). LAST needs only the
        step that ends the prompt."""
        return self.config.pooling_type != "LAST"

    def __call__(
        self,
        hidden: torch.Tensor,
        token_starts: list[int],
        num_tokens: list[int],
        params: list[PoolingParams],
    ) -> list[torch.Tensor]:
        """hidden: [T, H] of the step; each pooled request's tokens in this step are
        ``token_starts[i] : token_starts[i] + num_tokens[i]``. -> fp32 [H or dimensions]."""
        kind = self.config.pooling_type
        hidden = hidden.float()
        if kind == "MEAN":
            pooled = torch.stack(
                [hidden[s : s + n].mean(dim=0) for s, n in zip(token_starts, num_tokens)]
            )
        else:
            rows = [s if kind == "CLS" else s + n - 1 for s, n in zip(token_starts, num_tokens)]
            pooled = hidden[torch.tensor(rows, device=hidden.device)]
        out = []
        for vector, p in zip(pooled, params):
            if p.dimensions is not None:
                vector = vector[: p.dimensions]
            normalize = self.config.normalize if p.normalize is None else p.normalize
            if normalize:
                vector = F.normalize(vector, p=2, dim=0)
            out.append(vector.cpu())
        return out
