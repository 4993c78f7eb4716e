"""SchedulerOutput and ModelRunnerOutput: the step boundary between scheduling (engine/) and
execution (model_executor/). The model runner reads only these, never a Request."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    req_id: str
    token_ids: list[int]  # the tokens whose KV is computed this step (drafts last)
    start_pos: int  # position of token_ids[0] == tokens already in the KV cache
    block_ids: list[int]  # the whole block table
    needs_sample: bool  # this chunk ends the sequence, so the step samples its next token
    sampling_params: SamplingParams
    # Read-only views for penalties / min_tokens (the runner never mutates them).
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    # Draft tokens after the newest one (the tail of token_ids): the runner samples a token at
    # each of the 1 + len(spec_token_ids) positions and keeps the drafts it agrees with.
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted_req_ids: list[str] = field(default_factory=list)
    # Requests finished since the previous step: the runner drops their per-request state.
    finished_req_ids: set[str] = field(default_factory=set)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SampledToken:
    """One sampled token and, when asked for, its logprob and the top-k alternatives."""

    token_id: int
    logprob: float | None = None
    top_token_ids: list[int] | None = None
    top_logprobs: list[float] | None = None
    rank: int | None = None


@dataclass
class ModelRunnerOutput:
    # The new tokens of each sampling request: one, or with drafts, the accepted ones and the
    # token sampled after them.
    sampled: dict[str, list[SampledToken]]
