"""What one step's attention needs besides q, k, v: built by input_batch.build_inputs, read by
the attention backend."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DecodeMetadata:
    num_tokens: int
    block_tables: torch.Tensor  # [B, max_blocks] int64
    seq_lens: torch.Tensor  # [B] int64
    max_seq_len: int
    key_mask: torch.Tensor | None  # [B, 1, 1, L] bool, for a backend that gathers the blocks
    # With draft tokens: [B + 1] offsets of each sequence's query rows (its newest token and
    # drafts, the last positions of its seq_len), for a backend's verify kernel.
    query_start_loc: torch.Tensor | None = None
    max_query_len: int = 1
    # The sequences without drafts, first (one query row each): a backend may run them on its
    # decode kernel and only the rest on the verify kernel.
    num_single: int = 0


@dataclass
class PrefillSeq:
    token_start: int  # offset of this sequence's tokens in the batch
    num_tokens: int
    start_pos: int  # tokens already in the cache before this step
    block_table: torch.Tensor | None  # [num_blocks] int64, when start_pos > 0
    _key_mask: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def key_mask(self, num_keys: int) -> torch.Tensor:
        """[Q, num_keys] bool over the gathered (whole) blocks: the query at position p sees
        every key at position <= p. Built on first use, then shared by every layer of the step
        (only a backend without a paged prefill kernel asks)."""
        if self._key_mask is None:
            dev = self.block_table.device
            q_pos = self.start_pos + torch.arange(self.num_tokens, device=dev)
            self._key_mask = torch.arange(num_keys, device=dev)[None, :] <= q_pos[:, None]
        return self._key_mask


@dataclass
class CachedPrefills:
    """The prefills with earlier tokens cached (start_pos > 0: a chunk after the first, a
    prefix-cache hit), for a backend's paged prefill kernel: [P] int64 each, and the block
    tables [P, max_blocks] (only each row's first blocks, up to start_pos + num_tokens, mean
    anything)."""

    token_starts: torch.Tensor
    num_tokens: torch.Tensor
    start_pos: torch.Tensor
    block_tables: torch.Tensor


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    decode: DecodeMetadata | None
    prefills: list[PrefillSeq]
    # The prefills with nothing cached (start_pos == 0) as (token_start, num_tokens) int64
    # tensors, for a backend's fresh-prefill kernel (generic/prefill_attention.cpp).
    fresh_prefills: tuple[torch.Tensor, torch.Tensor] | None = None
    cached_prefills: CachedPrefills | None = None
    # Every scheduled token as a decode of its own context (its sequence's block table,
    # seq_len = position + 1), for a backend with ``per_token_rows``.
    token_rows: DecodeMetadata | None = None


@dataclass
class EncoderMetadata:
    """One step of an encoder (no KV cache): each sequence's tokens attend to all of its own
    tokens. ``pad_index`` [B, max_len] holds each sequence's token indices, then T (a zero row
    appended for padding); ``key_mask`` [B, 1, 1, max_len] is False on those pad slots."""

    seq_lens: list[int]
    pad_index: torch.Tensor
    key_mask: torch.Tensor
    token_index: torch.Tensor  # [T]: each token's slot in the flattened [B * max_len]
