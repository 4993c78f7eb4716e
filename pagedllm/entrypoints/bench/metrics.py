"""Latency statistics and goodput: the pure arithmetic behind every bench report.

Kept free of I/O so the figures users compare (percentiles, goodput under an SLO) are tested
exactly on synthetic data. Names follow ``vllm bench serve`` (ttft, tpot, itl, e2el, in ms).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 90, 95, 99)
# The per-request metrics a goodput SLO may bound (vLLM's names).
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class LatencySummary:
    """Distribution of one metric in milliseconds; all zeros when there are no samples."""

    mean: float
    median: float
    std: float
    percentiles: dict[int, float]

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> LatencySummary:
        if len(values_ms) == 0:
            return cls(0.0, 0.0, 0.0, {p: 0.0 for p in PERCENTILES})
        arr = np.asarray(values_ms, dtype=np.float64)
        return cls(
            mean=float(arr.mean()),
            median=float(np.median(arr)),
            std=float(arr.std()),
            percentiles={p: float(np.percentile(arr, p)) for p in PERCENTILES},
        )

    def as_flat_dict(self, metric: str) -> dict[str, float]:
        """vLLM's flat keys: mean_ttft_ms, median_ttft_ms, std_ttft_ms, p99_ttft_ms, ..."""
        out = {
            f"mean_{metric}_ms": self.mean,
            f"median_{metric}_ms": self.median,
            f"std_{metric}_ms": self.std,
        }
        out.update({f"p{p}_{metric}_ms": v for p, v in self.percentiles.items()})
        return out


def parse_goodput(specs: Iterable[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:100"]`` -> {"ttft": 500.0, "tpot": 100.0} (milliseconds)."""
    slo: dict[str, float] = {}
    for spec in specs or ():
        name, sep, value = spec.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(
                f"--goodput entries look like NAME:MS with NAME in {', '.join(SLO_METRICS)}, "
                f"got {spec!r}"
            )
        try:
            limit = float(value)
        except ValueError:
            raise ValueError(f"--goodput {spec!r}: {value!r} is not a number") from None
        if limit <= 0:
            raise ValueError(f"--goodput {spec!r}: the limit must be positive")
        slo[name] = limit
    return slo


def count_good(per_request_ms: Sequence[dict[str, float]], slo: dict[str, float]) -> int:
    """Requests meeting every bound of the SLO (each dict holds ttft/tpot/e2el in ms)."""
    return sum(all(req[name] <= limit for name, limit in slo.items()) for req in per_request_ms)


def ms(seconds: Iterable[float]) -> list[float]:
    return [s * 1000.0 for s in seconds]
