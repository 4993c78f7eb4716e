"""Request and iteration statistics as plain dataclasses, and the ``StatLogger`` interface that
consumes them.

The async engine's worker thread fills these after every loop iteration; a logger (the server's
Prometheus logger, or a test double) turns them into metrics. Nothing here knows Prometheus or
HTTP: the one module that imports prometheus_client lives in the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pagedllm.engine.scheduler import SchedulerStats
from pagedllm.outputs import EmbeddingRequestOutput, RequestOutput


@dataclass
class FinishedRequestStats:
    """One user request (all of its n samples) once it has finished or been aborted."""

    finish_reason: str  # "stop" | "length" | "abort" (of sample 0)
    num_prompt_tokens: int
    num_generation_tokens: int  # summed over the n samples
    e2e_latency: float  # seconds from arrival to the last output
    time_to_first_token: float | None  # None when aborted before any token
    # Mean seconds per output token after the first; None with fewer than two tokens.
    time_per_output_token: float | None


@dataclass
class IterationStats:
    """What one loop iteration of the engine produced."""

    num_prompt_tokens: int = 0  # prompts whose first token appeared this iteration
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)


class StatLogger(Protocol):
    """Receives a snapshot after every engine loop iteration, on the engine's worker thread.

    NOTE: implementations must be thread-safe with respect to their readers (prometheus_client's
    metric objects are).
    """

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats) -> None: ...


@dataclass
class _RequestTiming:
    arrival_time: float
    num_prompt_tokens: int = 0
    first_token_time: float | None = None
    num_generation_tokens: int = 0


class RequestStatsTracker:
    """Turns the engine's cumulative RequestOutputs into per-iteration token counts and
    per-request latencies. Used from the engine's worker thread only."""

    def __init__(self) -> None:
        self._requests: dict[str, _RequestTiming] = {}

    def add(self, request_id: str, arrival_time: float) -> None:
        self._requests[request_id] = _RequestTiming(arrival_time)

    def update(
        self, outputs: list[RequestOutput | EmbeddingRequestOutput], now: float
    ) -> IterationStats:
        stats = IterationStats()
        for out in outputs:
            timing = self._requests.get(out.request_id)
            if timing is None:
                continue
            timing.num_prompt_tokens = len(out.prompt_token_ids)
            if isinstance(out, EmbeddingRequestOutput):  # its one output: the embedding
                self._pooled(out, timing, now, stats)
                continue
            total = sum(len(c.token_ids) for c in out.outputs)
            new_tokens = total - timing.num_generation_tokens
            timing.num_generation_tokens = total
            stats.num_generation_tokens += new_tokens
            if timing.first_token_time is None and total > 0:
                timing.first_token_time = now
                stats.num_prompt_tokens += timing.num_prompt_tokens
                stats.time_to_first_tokens.append(now - timing.arrival_time)
            if out.finished:
                del self._requests[out.request_id]
                stats.finished_requests.append(_finished(out, timing, now))
        return stats

    def _pooled(
        self, out: EmbeddingRequestOutput, timing: _RequestTiming, now: float, stats: IterationStats
    ) -> None:
        del self._requests[out.request_id]
        ttft = None
        if out.outputs is not None:
            ttft = now - timing.arrival_time
            stats.num_prompt_tokens += timing.num_prompt_tokens
            stats.time_to_first_tokens.append(ttft)
        stats.finished_requests.append(
            FinishedRequestStats(
                finish_reason=out.finish_reason or "abort",
                num_prompt_tokens=timing.num_prompt_tokens,
                num_generation_tokens=0,
                e2e_latency=now - timing.arrival_time,
                time_to_first_token=ttft,
                time_per_output_token=None,
            )
        )


def _finished(out: RequestOutput, timing: _RequestTiming, now: float) -> FinishedRequestStats:
    ttft = None
    if timing.first_token_time is not None:
        ttft = timing.first_token_time - timing.arrival_time
    tpot = None
    # Per sample, the tokens after the first arrive between first_token_time and now.
    num_later_tokens = max((len(c.token_ids) for c in out.outputs), default=0) - 1
    if timing.first_token_time is not None and num_later_tokens > 0:
        tpot = (now - timing.first_token_time) / num_later_tokens
    return FinishedRequestStats(
        finish_reason=(out.outputs[0].finish_reason if out.outputs else None) or "abort",
        num_prompt_tokens=timing.num_prompt_tokens,
        num_generation_tokens=timing.num_generation_tokens,
        e2e_latency=now - timing.arrival_time,
        time_to_first_token=ttft,
        time_per_output_token=tpot,
    )
