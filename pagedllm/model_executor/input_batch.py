"""Turn a step's requests (request_state.py) into the flat tensors of one forward pass
(vectorized with numpy; the block tables are rows of the runner's persistent table).

All scheduled tokens of the step form one varlen batch:

    input_ids   [ d0 d1 d2 | p0 p0 p0 p0 | p1 p1 ]   decode requests first, then prefills
    positions   [ 17 40  9 |  0  1  2  3 | 32 33 ]   start_pos + offset within the chunk
    slot_mapping  block_table[pos // block_size] * block_size + pos % block_size

A decode with draft tokens (speculative decoding) brings them after its newest token; it stays
with the decodes when the attention backend's verify kernel can take it (else it runs as a
prefill chunk), and its logits are computed at every one of its positions.

With ``pad`` the token rows (and the rows whose logits are computed) are rounded up to a bucket
(``padded_rows``): oneDNN builds a new GEMM kernel for every new row count, ~8 ms on each bf16
decode step whose batch size is new, and the batch size changes at almost every step; and a
lone row is run as two, so that its result does not depend on the batch. Pad rows
hold token 0 at position 0; they write no K/V and attend to nothing, and their outputs are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.model_executor.backends.attention_metadata import (
    AttentionMetadata,
    CachedPrefills,
    DecodeMetadata,
    EncoderMetadata,
    PrefillSeq,
)
from pagedllm.model_executor.backends.torch_attention import TorchAttentionBackend
from pagedllm.model_executor.request_state import StepRequest


@dataclass
class ModelInputs:
    requests: list[StepRequest]  # in batch order (decodes first)
    num_tokens: int  # scheduled tokens; input_ids may hold pad rows after them
    # [len(requests) + 1]: where each request's tokens start in the batch (then the total)
    query_start: np.ndarray
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata | EncoderMetadata
    sample_rows: list[int]  # indices into ``requests`` that sample this step
    # Logit rows per sampling request: 1, or 1 + its drafts.
    sample_num_rows: list[int]
    # Flat token index of each logit row (then, padded, repeats of the last).
    sample_token_index: torch.Tensor


def padded_rows(n: int) -> int:
    """The bucket n rows round up to: exact from 2 to 15, then multiples of 16, 64 past 512.

    NOTE: one row runs as two. oneDNN's bf16 GEMM sums a lone row in another order than rows of
    a larger batch (on AVX-512-BF16, e.g. 10 of 100 rows of the 1536-wide down projection
    differ), so a sequence decoding alone got other bf16 logits, and in greedy decoding other
    text, than the same sequence decoding beside others. Two rows up still change with the row
    count now and then (6 of 64 rows of that projection on Zen 5); --deterministic removes the
    dependence (backends/batch_invariant.py)."""
    if n < 16:
        return 2 if n == 1 else n
    step = 16 if n <= 512 else 64
    return -(-n // step) * step


def build_inputs(
    scheduled: list[StepRequest],
    block_table: np.ndarray,
    block_size: int,
    attention: TorchAttentionBackend,
    device: torch.device,
    int8_cache: bool = False,
    pad: bool = False,
) -> ModelInputs:
    in_place = attention.reads_cache_in_place
    multi = attention.can_verify(block_size, int8_cache)

    def is_prefill(s: StepRequest) -> bool:
        return s.num_tokens - (len(s.spec_token_ids) if multi else 0) > 1

    # Stable: decodes first (those without drafts, then those with), then prefills.
    requests = sorted(scheduled, key=lambda s: (is_prefill(s), bool(s.spec_token_ids)))
    n = len(requests)
    q_lens = np.fromiter((s.num_tokens for s in requests), dtype=np.int64, count=n)
    starts = np.fromiter((s.start_pos for s in requests), dtype=np.int64, count=n)
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(q_lens, out=cu[1:])
    total = int(cu[-1])
    input_ids = np.fromiter((t for s in requests for t in s.token_ids), dtype=np.int64, count=total)
    req_of_token = np.repeat(np.arange(n), q_lens)
    positions = np.arange(total, dtype=np.int64) - cu[:-1][req_of_token] + starts[req_of_token]
    seq_lens = starts + q_lens

    num_blocks = -(-seq_lens // block_size)
    rows = np.fromiter((s.state.row for s in requests), dtype=np.int64, count=n)
    table = block_table[rows, : int(num_blocks.max())]
    slots = table[req_of_token, positions // block_size] * block_size + positions % block_size

    def to(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    num_decodes = sum(1 for s in requests if not is_prefill(s))
    decode = None
    if num_decodes:
        decode = _decode_meta(
            table[:num_decodes],
            seq_lens[:num_decodes],
            cu[: num_decodes + 1],
            block_size,
            to,
            in_place,
        )
    prefills = [
        _prefill_seq(int(cu[i]), int(q_lens[i]), int(starts[i]), table[i, : num_blocks[i]], to)
        for i in range(num_decodes, n)
    ]
    fresh = num_decodes + np.flatnonzero(starts[num_decodes:] == 0)
    fresh_prefills = (to(cu[fresh]), to(q_lens[fresh])) if len(fresh) else None
    cached = num_decodes + np.flatnonzero(starts[num_decodes:] > 0)
    cached_prefills = None
    if len(cached):
        cached_prefills = CachedPrefills(
            token_starts=to(cu[cached]),
            num_tokens=to(q_lens[cached]),
            start_pos=to(starts[cached]),
            block_tables=to(table[cached, : int(num_blocks[cached].max())]),
        )
    sample_rows = [i for i, s in enumerate(requests) if s.needs_sample]
    num_rows = np.fromiter(
        (1 + len(requests[i].spec_token_ids) for i in sample_rows), dtype=np.int64
    )
    sample_index = cu[1:][sample_rows] - 1
    if len(num_rows) and num_rows.max() > 1:  # every position of a request with drafts
        ends = np.cumsum(num_rows)
        sample_index = np.repeat(sample_index - ends + 1, num_rows) + np.arange(int(ends[-1]))
    token_rows = None
    if attention.per_token_rows:
        lens = positions + 1
        token_rows = DecodeMetadata(
            num_tokens=total,
            block_tables=to(table[req_of_token]),
            seq_lens=to(lens),
            max_seq_len=int(lens.max()),
            key_mask=None,
        )
    if pad:
        padded = padded_rows(total)
        input_ids = np.concatenate([input_ids, np.zeros(padded - total, dtype=np.int64)])
        positions = np.concatenate([positions, np.zeros(padded - total, dtype=np.int64)])
        num_samples = len(sample_index)
        if num_samples:
            extra = padded_rows(num_samples) - num_samples
            sample_index = np.concatenate([sample_index, np.full(extra, sample_index[-1])])
    return ModelInputs(
        requests=requests,
        num_tokens=total,
        query_start=cu,
        input_ids=to(input_ids),
        positions=to(positions),
        attn=AttentionMetadata(
            slot_mapping=to(slots),
            decode=decode,
            prefills=prefills,
            fresh_prefills=fresh_prefills,
            cached_prefills=cached_prefills,
            token_rows=token_rows,
        ),
        sample_rows=sample_rows,
        sample_num_rows=num_rows.tolist(),
        sample_token_index=to(sample_index),
    )


def build_encoder_inputs(scheduled: list[StepRequest], device: torch.device) -> ModelInputs:
    """An encoder's step: whole prompts (positions from 0), each attending to all of its own
    tokens, nothing cached; every request's hidden states are pooled."""
    n = len(scheduled)
    lens = np.fromiter((s.num_tokens for s in scheduled), dtype=np.int64, count=n)
    assert all(s.start_pos == 0 for s in scheduled), "an encoder runs whole prompts"
    total, longest = int(lens.sum()), int(lens.max())
    input_ids = np.fromiter((t for s in scheduled for t in s.token_ids), np.int64, count=total)
    cu = np.concatenate([[0], np.cumsum(lens)])
    positions = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], lens)
    offsets = np.arange(longest)[None, :]
    valid = offsets < lens[:, None]
    pad_index = np.where(valid, cu[:-1, None] + offsets, total)  # pads read the zero row
    token_index = (np.repeat(np.arange(n), lens) * longest + positions).astype(np.int64)

    def to(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return ModelInputs(
        requests=list(scheduled),
        num_tokens=total,
        query_start=cu,
        input_ids=to(input_ids),
        positions=to(positions),
        attn=EncoderMetadata(
            seq_lens=lens.tolist(),
            pad_index=to(pad_index),
            key_mask=to(valid[:, None, None, :]),
            token_index=to(token_index),
        ),
        sample_rows=list(range(n)),
        sample_num_rows=[1] * n,
        sample_token_index=to(cu[1:] - 1),
    )


def _decode_meta(table, seq_lens, query_start, block_size, to, in_place: bool) -> DecodeMetadata:
    nb = int(-(-seq_lens.max() // block_size))
    mask = None
    if not in_place:  # the backend gathers the blocks: mask the keys past each length
        keys = np.arange(nb * block_size)[None, :] < seq_lens[:, None]
        mask = to(keys[:, None, None, :])
    q_lens = np.diff(query_start)
    max_query_len = int(q_lens.max())
    return DecodeMetadata(
        num_tokens=int(query_start[-1]),
        block_tables=to(table[:, :nb]),
        seq_lens=to(seq_lens),
        max_seq_len=int(seq_lens.max()),
        key_mask=mask,
        query_start_loc=to(query_start) if max_query_len > 1 else None,
        max_query_len=max_query_len,
        num_single=int(np.argmax(q_lens > 1)) if max_query_len > 1 else len(q_lens),
    )


def _prefill_seq(token_start, q_len, start, table, to) -> PrefillSeq:
    """A prefill chunk; with part of its context cached, the blocks that hold it (a backend
    without a paged prefill kernel gathers them)."""
    return PrefillSeq(token_start, q_len, start, to(table) if start else None)
