"""SchedulerOutput and ModelRunnerOutput: the step boundary between scheduling (engine/) and
execution (model_executor/). The model runner reads only these, never a Request.

As in vLLM v1, a request's whole state (prompt, sampling params, block table) crosses the
boundary once, when it is first scheduled (again after a preemption): a NewRequestData. From
then on the runner keeps it, and each step brings only what changed, a CachedRequestData: the
tokens appended since (the sampled ones), the blocks allocated since, and how many tokens have
KV. So a step's message grows with the new tokens, not with the requests' lengths, which is
also what a distributed executor sends to its workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    # Tokens generated before a preemption (empty for a request scheduled the first time).
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]  # the whole block table so far
    num_computed_tokens: int  # tokens already in the KV cache (a prefix-cache hit)
    # A pooling request: the step that ends its prompt pools it instead of sampling.
    pooling_params: PoolingParams | None = None
    lora_id: int | None = None  # the LoRA adapter it runs with (None: the base model)


@dataclass
class CachedRequestData:
    req_id: str
    new_token_ids: list[int]  # appended since the request was last scheduled
    new_block_ids: list[int]  # allocated since then, in block-table order
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # Tokens to compute per request this step, drafts included, in scheduling order.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Draft tokens after a decode's newest token: the runner samples a token at each of the
    # 1 + len(drafts) positions and keeps the drafts it agrees with.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Structured outputs: for each constrained request that samples this step, the tokens its
    # grammar allows at each of its 1 + len(drafts) sampled positions, as a bitmask
    # ([rows, ceil(vocab / 32)] int32, bit t of word t // 32 set: token t allowed).
    grammar_bitmasks: dict[str, np.ndarray] = field(default_factory=dict)
    # Requests preempted or finished since the previous step: the runner drops their state.
    preempted_req_ids: list[str] = field(default_factory=list)
    finished_req_ids: set[str] = field(default_factory=set)
    # The step's shape, as the scheduler sees it: decodes (the newest output token, drafts
    # aside) and the tokens of prompt chunks (and of recomputed outputs after a preemption).
    num_decodes: int = 0
    num_prefill_tokens: int = 0

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def num_draft_tokens(self) -> int:
        return sum(len(d) for d in self.spec_token_ids.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


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
    # Pooling requests whose prompt ended this step: their embedding (fp32, on the CPU).
    pooled: dict[str, Any] = field(default_factory=dict)
