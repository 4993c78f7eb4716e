"""The model runner's own record of the requests it runs, kept between steps (vLLM v1's
persistent batch): each request's tokens and sampling params, and one block table for all of
them, a numpy array with a row per request that grows as blocks are allocated. A step applies
the scheduler's deltas (scheduler_output.py) and reads its rows from here, instead of the whole
state of every request crossing the step boundary and the tables being rebuilt in Python."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams
from pagedllm.scheduler_output import SchedulerOutput


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]  # prompt, then outputs
    num_prompt_tokens: int
    sampling_params: SamplingParams
    row: int  # of the block table
    num_blocks: int
    num_computed_tokens: int
    pooling_params: PoolingParams | None = None
    lora_id: int | None = None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class StepRequest:
    """One request's part of a step: tokens start_pos .. start_pos + num_tokens - 1 (drafts
    last)."""

    state: CachedRequestState
    start_pos: int
    num_tokens: int
    spec_token_ids: list[int]

    @property
    def req_id(self) -> str:
        return self.state.req_id

    @property
    def sampling_params(self) -> SamplingParams:
        return self.state.sampling_params

    @property
    def token_ids(self) -> list[int]:
        end = self.start_pos + self.num_tokens - len(self.spec_token_ids)
        return self.state.token_ids[self.start_pos : end] + self.spec_token_ids

    @property
    def needs_sample(self) -> bool:
        """This chunk ends the sequence, so the step samples its next token."""
        n = self.num_tokens - len(self.spec_token_ids)
        return self.start_pos + n == len(self.state.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.state.prompt_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.state.output_token_ids


class BlockTable:
    """Block ids of every request, a row each ([rows, blocks], int64), rows reused."""

    def __init__(self, rows: int = 64, blocks: int = 64) -> None:
        self.table = np.zeros((rows, blocks), dtype=np.int64)
        self.free_rows = list(range(rows - 1, -1, -1))

    def add_row(self) -> int:
        if not self.free_rows:
            rows = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self.free_rows.pop()

    def free_row(self, row: int) -> None:
        self.free_rows.append(row)

    def append(self, row: int, start: int, block_ids: list[int]) -> None:
        end = start + len(block_ids)
        if end > self.table.shape[1]:
            width = max(end, 2 * self.table.shape[1])
            grown = np.zeros((self.table.shape[0], width), dtype=np.int64)
            grown[:, : self.table.shape[1]] = self.table
            self.table = grown
        self.table[row, start:end] = block_ids


class RequestStates:
    def __init__(self) -> None:
        self.states: dict[str, CachedRequestState] = {}
        self.block_table = BlockTable()

    def __len__(self) -> int:
        return len(self.states)

    def update(self, out: SchedulerOutput) -> list[StepRequest]:
        """Apply the step's deltas; return its requests in scheduling order."""
        for req_id in (*out.finished_req_ids, *out.preempted_req_ids):
            self._drop(req_id)
        for new in out.new_requests:
            self._drop(new.req_id)  # resumed after a preemption in this very step's schedule
            row = self.block_table.add_row()
            self.block_table.append(row, 0, new.block_ids)
            self.states[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                token_ids=[*new.prompt_token_ids, *new.output_token_ids],
                num_prompt_tokens=len(new.prompt_token_ids),
                sampling_params=new.sampling_params,
                row=row,
                num_blocks=len(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                pooling_params=new.pooling_params,
                lora_id=new.lora_id,
            )
        for cached in out.cached_requests:
            state = self.states[cached.req_id]
            state.token_ids.extend(cached.new_token_ids)
            if cached.new_block_ids:
                self.block_table.append(state.row, state.num_blocks, cached.new_block_ids)
                state.num_blocks += len(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens
        return [
            StepRequest(
                self.states[req_id],
                self.states[req_id].num_computed_tokens,
                n,
                out.spec_token_ids.get(req_id, []),
            )
            for req_id, n in out.num_scheduled_tokens.items()
        ]

    def _drop(self, req_id: str) -> None:
        state = self.states.pop(req_id, None)
        if state is not None:
            self.block_table.free_row(state.row)
