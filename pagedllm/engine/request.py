"""Request: the engine's record of one sequence being generated (one per sample when n > 1)."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.engine.block_pool import BlockKey
    from pagedllm.engine.structured_output.backend import GrammarMatcher


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH_CAPPED = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH_CAPPED,
            RequestStatus.FINISHED_ABORTED,
        )

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


class Request:
    """Token-level state: the scheduler reasons only about ``num_computed_tokens`` and
    ``num_tokens``.

    NOTE: ``num_computed_tokens <= num_tokens`` always; a request needs a sample once its
    computed tokens reach ``num_tokens`` (every prompt token, and every output token but the
    newest, has KV in the cache).
    """

    def __init__(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_time: float | None = None,
        group_id: str | None = None,
        grammar: GrammarMatcher | None = None,
        pooling_params: PoolingParams | None = None,
        lora_id: int | None = None,
        cache_salt: bytes | None = None,
    ) -> None:
        """``pooling_params``: a pooling (embedding) request, which finishes with the step
        that computes the end of its prompt; its sampling_params only bound its length.
        ``lora_id``: the LoRA adapter it runs with; ``cache_salt`` seeds its prefix-cache
        hashes (one per loaded adapter, so two adapters never share KV)."""
        self.req_id = req_id
        # The API call it came from (its prompts x n samples); admission is fair between groups.
        self.group_id = req_id if group_id is None else group_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_cached_tokens: int | None = None  # prefix-cache hit at first scheduling
        self.num_preemptions = 0
        self.block_hashes: list[BlockKey] = []
        self.first_token_time: float | None = None
        # Draft tokens to verify after the newest token in the next step (speculative decoding).
        self.spec_token_ids: list[int] = []
        # Structured outputs: the request's position in its grammar (its own, also for each
        # of n samples), advanced by every token it generates.
        self.grammar = grammar
        self.pooling_params = pooling_params
        self.lora_id = lora_id
        self.cache_salt = cache_salt
        # How many of its tokens and blocks the step messages have carried to the model runner
        # (it keeps them between steps; see scheduler_output.py).
        self.num_tokens_sent = 0
        self.num_blocks_sent = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_tokens(self) -> int:
        assert self.sampling_params.max_tokens is not None, "engine fills max_tokens on add"
        return self.sampling_params.max_tokens

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def __repr__(self) -> str:
        return (
            f"Request({self.req_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
