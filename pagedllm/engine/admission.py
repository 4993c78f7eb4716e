"""Admission control for the async engine: a bound on the sequences waiting for their first
token, so an overloaded server answers "too many requests, retry in N s" at once instead of
queueing without end (each waiting request holds a connection, memory, and a client's hope).

Runs on the event loop (AsyncLLM's front), never on the engine thread: a request counts from
``admit`` until its first output, error or abort (``started``). Retry-After comes from the rate
at which waiting requests have been starting lately.
"""

from __future__ import annotations

import math
import time
from collections import deque

DRAIN_WINDOW_S = 20.0  # how far back the start rate is measured
MAX_RETRY_AFTER_S = 60


class QueueFullError(RuntimeError):
    """The waiting queue is full; ``retry_after`` is the server's estimate in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def default_max_waiting(max_num_seqs: int, kv_capacity_seqs: int) -> int:
    """Twice what could start as soon as the running ones finish: the seats, or the sequences
    of max_model_len the KV cache holds, whichever is larger."""
    return 2 * max(max_num_seqs, kv_capacity_seqs)


class AdmissionControl:
    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting_requests must be at least 1, got {max_waiting}")
        self.max_waiting = max_waiting
        self._waiting: dict[str, int] = {}  # request id -> its sequences (n)
        self.num_waiting = 0
        self._starts: deque[tuple[float, int]] = deque()  # (time, sequences) started

    def admit(self, request_id: str, num_seqs: int) -> None:
        """Count a request in, or raise QueueFullError if its sequences do not fit."""
        if self.num_waiting + num_seqs > self.max_waiting:
            retry = self.retry_after(self.num_waiting + num_seqs - self.max_waiting)
            raise QueueFullError(
                f"the server is at capacity: {self.num_waiting} sequences are waiting for "
                f"their first token (--max-waiting-requests {self.max_waiting}); retry in "
                f"{retry} s",
                retry,
            )
        self._waiting[request_id] = num_seqs
        self.num_waiting += num_seqs

    def started(self, request_id: str) -> None:
        """The request's first output, error or abort: it no longer waits (idempotent)."""
        num_seqs = self._waiting.pop(request_id, 0)
        if num_seqs:
            self.num_waiting -= num_seqs
            self._starts.append((time.monotonic(), num_seqs))

    def retry_after(self, excess: int) -> int:
        """Seconds until ``excess`` more sequences will have started, at the recent rate."""
        now = time.monotonic()
        while self._starts and self._starts[0][0] < now - DRAIN_WINDOW_S:
            self._starts.popleft()
        started = sum(n for _, n in self._starts)
        if not started:
            return MAX_RETRY_AFTER_S // 6  # nothing started lately: no rate to go by
        span = max(now - self._starts[0][0], 1.0)
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(excess * span / started)))
