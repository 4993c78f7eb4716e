"""When each request of a serving benchmark is sent: all at once, or a seeded Poisson process.

A fixed seed makes two runs (or two engines) see the same arrival pattern, so their latency
figures differ only by the server.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(num_requests: int, request_rate: float, seed: int = 0) -> list[float]:
    """Send times in seconds after the start, the first at 0.

    ``request_rate`` is the mean number of requests per second; ``inf`` sends everything at
    once. Gaps between requests are exponential (a Poisson process), as in ``vllm bench serve``.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be non-negative, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"--request-rate must be positive (or inf), got {request_rate}")
    if math.isinf(request_rate) or num_requests == 0:
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / request_rate, size=num_requests - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
