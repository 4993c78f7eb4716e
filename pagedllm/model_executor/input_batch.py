"""Turn a SchedulerOutput into the flat tensors of one forward pass (vectorized with numpy).

All scheduled tokens of the step form one varlen batch:

    input_ids   [ d0 d1 d2 | p0 p0 p0 p0 | p1 p1 ]   decode requests first, then prefills
    positions   [ 17 40  9 |  0  1  2  3 | 32 33 ]   start_pos + offset within the chunk
    slot_mapping  block_table[pos // block_size] * block_size + pos % block_size
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.scheduler_output import ScheduledRequest
from pagedllm.model_executor.layers.attention import AttentionGroup, AttentionMetadata


@dataclass
class ModelInputs:
    requests: list[ScheduledRequest]  # in batch order (decodes first)
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    query_start_loc: np.ndarray  # [B+1]
    sample_rows: list[int]  # indices into ``requests`` that sample this step
    sample_token_index: torch.Tensor  # flat token index of each sampling request's last token


def build_inputs(
    scheduled: list[ScheduledRequest], block_size: int, device: torch.device
) -> ModelInputs:
    requests = sorted(scheduled, key=lambda s: s.num_tokens > 1)  # stable: decodes first
    q_lens = np.fromiter((s.num_tokens for s in requests), dtype=np.int64, count=len(requests))
    starts = np.fromiter((s.start_pos for s in requests), dtype=np.int64, count=len(requests))
    cu = np.zeros(len(requests) + 1, dtype=np.int64)
    np.cumsum(q_lens, out=cu[1:])
    total = int(cu[-1])
    input_ids = np.fromiter(
        (t for s in requests for t in s.token_ids), dtype=np.int64, count=total
    )
    req_of_token = np.repeat(np.arange(len(requests)), q_lens)
    positions = np.arange(total, dtype=np.int64) - cu[:-1][req_of_token] + starts[req_of_token]
    seq_lens = starts + q_lens

    num_blocks_needed = -(-seq_lens // block_size)
    table = np.zeros((len(requests), int(num_blocks_needed.max())), dtype=np.int64)
    for i, s in enumerate(requests):
        n = int(num_blocks_needed[i])
        table[i, :n] = s.block_ids[:n]
    slots = table[req_of_token, positions // block_size] * block_size + positions % block_size

    num_decodes = int(np.searchsorted(q_lens > 1, True))  # q_lens sorted: 1s first
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    decode = prefill = None
    if num_decodes:
        decode = _decode_group(table[:num_decodes], seq_lens[:num_decodes], block_size, to)
    if num_decodes < len(requests):
        prefill = _prefill_group(
            table[num_decodes:], q_lens[num_decodes:], starts[num_decodes:], block_size, to
        )
    sample_rows = [i for i, s in enumerate(requests) if s.needs_sample]
    return ModelInputs(
        requests=requests,
        input_ids=to(input_ids),
        positions=to(positions),
        attn=AttentionMetadata(slot_mapping=to(slots), decode=decode, prefill=prefill),
        query_start_loc=cu,
        sample_rows=sample_rows,
        sample_token_index=to(cu[1:][sample_rows] - 1),
    )


def _decode_group(table, seq_lens, block_size, to) -> AttentionGroup:
    nb = int(-(-seq_lens.max() // block_size))
    max_len = nb * block_size
    mask = np.arange(max_len)[None, :] < seq_lens[:, None]
    return AttentionGroup(
        num_tokens=len(seq_lens),
        block_tables=to(table[:, :nb]),
        key_mask=to(mask[:, None, None, :]),
        pad_valid=None,
        max_query_len=1,
    )


def _prefill_group(table, q_lens, starts, block_size, to) -> AttentionGroup:
    seq_lens = starts + q_lens
    nb = int(-(-seq_lens.max() // block_size))
    max_len = nb * block_size
    max_q = int(q_lens.max())
    offsets = np.arange(max_q)[None, :]
    valid = offsets < q_lens[:, None]  # [B, Q]
    # Padding query slots sit at position 0, so they attend key 0 only (never an empty row).
    q_pos = np.where(valid, starts[:, None] + offsets, 0)
    mask = np.arange(max_len)[None, None, :] <= q_pos[:, :, None]  # [B, Q, L]
    return AttentionGroup(
        num_tokens=int(q_lens.sum()),
        block_tables=to(table[:, :nb]),
        key_mask=to(mask[:, None]),
        pad_valid=to(valid.reshape(-1)),
        max_query_len=max_q,
    )
