"""PrometheusStatLogger: the engine's stats as vLLM's metrics under the ``pagedllm:`` prefix
(or vLLM's own ``vllm:``, or both: ``--metrics-prefix``), and the HTTP responses by status.

NOTE: the only module that imports prometheus_client. Each server app owns one logger with its
own CollectorRegistry (never the global one), so several apps in one process (tests) do not
collide. ``record`` runs on the engine's worker thread; prometheus_client metrics are
thread-safe, and ``render`` runs on the event loop for GET /metrics.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pagedllm.engine.scheduler import SchedulerStats
from pagedllm.engine.stats import IterationStats

# vLLM's buckets.
TTFT_BUCKETS = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
]
TPOT_BUCKETS = [
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
]
E2E_BUCKETS = [
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
]
FINISH_REASONS = ("stop", "length", "abort")
REJECT_REASONS = ("queue_full", "timeout")


METRICS_PREFIXES = ("pagedllm", "vllm", "both")


class _Fan:
    """One metric under each prefix: every update goes to all of them."""

    def __init__(self, children: list) -> None:
        self.children = children

    def set(self, value: float) -> None:
        for c in self.children:
            c.set(value)

    def inc(self, amount: float = 1.0) -> None:
        for c in self.children:
            c.inc(amount)

    def observe(self, value: float) -> None:
        for c in self.children:
            c.observe(value)


class PrometheusStatLogger:
    """``metrics_prefix``: ``pagedllm`` (``pagedllm:num_requests_running``, ...), ``vllm``
    (vLLM's own names, so dashboards and alerts written for vLLM work unchanged) or ``both``."""

    def __init__(self, model_name: str, metrics_prefix: str = "pagedllm") -> None:
        if metrics_prefix not in METRICS_PREFIXES:
            raise ValueError(
                f"metrics_prefix must be one of {', '.join(METRICS_PREFIXES)}, got "
                f"{metrics_prefix!r}"
            )
        prefixes = ("pagedllm", "vllm") if metrics_prefix == "both" else (metrics_prefix,)
        self.registry = CollectorRegistry()
        r = self.registry

        def fan(kind, name: str, doc: str, extra: tuple[str, ...] = (), **kw) -> list:
            return [
                kind(f"{p}:{name}", doc, ["model_name", *extra], registry=r, **kw) for p in prefixes
            ]

        def gauge(name: str, doc: str) -> _Fan:
            return _Fan([m.labels(model_name) for m in fan(Gauge, name, doc)])

        def counter(name: str, doc: str) -> _Fan:
            return _Fan([m.labels(model_name) for m in fan(Counter, name, doc)])

        def histogram(name: str, doc: str, buckets: list[float]) -> _Fan:
            metrics = fan(Histogram, name, doc, buckets=buckets)
            return _Fan([m.labels(model_name) for m in metrics])

        def by_label(name: str, doc: str, label: str, values: tuple[str, ...]) -> dict:
            metrics = fan(Counter, name, doc, (label,))
            return {v: _Fan([m.labels(model_name, v) for m in metrics]) for v in values}

        self.num_requests_running = gauge(
            "num_requests_running", "Number of requests in the running batch."
        )
        self.num_requests_waiting = gauge(
            "num_requests_waiting", "Number of requests waiting to be scheduled."
        )
        self.kv_cache_usage = gauge(
            "kv_cache_usage_perc",
            "KV-cache usage: 1 means 100 percent (blocks only the prefix cache keeps are free).",
        )
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "generation_tokens", "Number of generation tokens processed."
        )
        self.num_preemptions = counter(
            "num_preemptions", "Cumulative number of preemptions by the scheduler."
        )
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prefix-cache queries, in tokens."
        )
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prefix-cache hits, in tokens.")
        self.spec_decode_num_draft_tokens = counter(
            "spec_decode_num_draft_tokens", "Draft tokens proposed and checked."
        )
        self.spec_decode_num_accepted_tokens = counter(
            "spec_decode_num_accepted_tokens", "Draft tokens accepted."
        )
        self.request_success = by_label(
            "request_success",
            "Count of finished requests, by finish reason.",
            "finished_reason",
            FINISH_REASONS,
        )
        self.request_rejected = by_label(
            "request_rejected",
            "Requests turned away: queue_full (429, the waiting queue is full) or timeout (504, "
            "aborted at their deadline).",
            "reason",
            REJECT_REASONS,
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds",
            "Histogram of the mean time per output token (after the first) of each request.",
            TPOT_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds",
            "Histogram of end-to-end request latency in seconds.",
            E2E_BUCKETS,
        )
        # HTTP responses, by route, method and status class, under the name and labels of
        # vLLM's (prometheus-fastapi-instrumentator's) http_requests_total.
        self.http_requests = Counter(
            "http_requests",
            "HTTP responses by handler (the route; 'none' for unknown paths), method and status "
            "class (2xx, 4xx, 5xx; 499: the client hung up).",
            ["handler", "method", "status"],
            registry=r,
        )
        # The scheduler reports running totals; counters advance by the difference.
        self._last: SchedulerStats | None = None

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats) -> None:
        s = scheduler_stats
        self.num_requests_running.set(s.num_running)
        self.num_requests_waiting.set(s.num_waiting)
        self.kv_cache_usage.set(s.kv_cache_usage)
        last = self._last
        if last is not None:
            self.num_preemptions.inc(max(0, s.num_preemptions_total - last.num_preemptions_total))
            self.prefix_cache_queries.inc(
                max(0, s.prefix_cache_queries - last.prefix_cache_queries)
            )
            self.prefix_cache_hits.inc(max(0, s.prefix_cache_hits - last.prefix_cache_hits))
            self.spec_decode_num_draft_tokens.inc(
                max(0, s.spec_num_draft_tokens - last.spec_num_draft_tokens)
            )
            self.spec_decode_num_accepted_tokens.inc(
                max(0, s.spec_num_accepted_tokens - last.spec_num_accepted_tokens)
            )
        self._last = s
        it = iteration_stats
        self.prompt_tokens.inc(it.num_prompt_tokens)
        self.generation_tokens.inc(it.num_generation_tokens)
        for ttft in it.time_to_first_tokens:
            self.time_to_first_token.observe(ttft)
        for req in it.finished_requests:
            counter = self.request_success.get(req.finish_reason)
            if counter is not None:
                counter.inc()
            self.e2e_request_latency.observe(req.e2e_latency)
            if req.time_per_output_token is not None:
                self.time_per_output_token.observe(req.time_per_output_token)

    def record_rejection(self, reason: str) -> None:
        """Called on the event loop when a request is turned away."""
        counter = self.request_rejected.get(reason)
        if counter is not None:
            counter.inc()

    def record_http(self, handler: str, method: str, status: int) -> None:
        """Called on the event loop as each response starts. 499 (the client hung up; nobody
        reads the answer) keeps its own status, so client hang-ups are not counted as errors."""
        label = "499" if status == 499 else f"{status // 100}xx"
        self.http_requests.labels(handler, method, label).inc()

    def render(self) -> tuple[bytes, str]:
        """-> (Prometheus text exposition, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
