"""The sweep's outputs: a CSV row per concurrency and the throughput-latency plot.

The plot is what a user reads to pick ``--max-num-seqs``: output tokens/s (top) rises with
concurrency until the machine saturates, while TTFT p95 (bottom) climbs; the right setting is
the highest concurrency whose latency still meets the SLO (drawn as a dashed line when given).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from typing import Any

CSV_COLUMNS = (
    "max_concurrency",
    "num_prompts",
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p95_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p95_tpot_ms",
    "median_itl_ms",
    "p99_itl_ms",
    "mean_e2el_ms",
    "p95_e2el_ms",
)


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """One row per run; missing figures are left empty."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in CSV_COLUMNS})


def write_plot(
    path: str,
    rows: Sequence[dict[str, Any]],
    title: str = "",
    ttft_slo_ms: float | None = None,
) -> None:
    """Two panels against concurrency (log2 axis): output tokens/s, and TTFT p95 in ms."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    points = sorted(rows, key=lambda r: r["max_concurrency"])
    xs = [r["max_concurrency"] for r in points]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 6.5))
    try:
        top.plot(xs, [r["output_throughput"] for r in points], "o-", color="tab:blue")
        top.set_ylabel("output tokens/s")
        top.set_ylim(bottom=0)
        top.grid(True, alpha=0.3)
        top.set_title(title or "throughput and latency against concurrency")

        bottom.plot(xs, [r["p95_ttft_ms"] for r in points], "s-", color="tab:red", label="TTFT p95")
        if ttft_slo_ms is not None:
            bottom.axhline(ttft_slo_ms, linestyle="--", color="gray", label="TTFT SLO")
        bottom.set_ylabel("TTFT p95 (ms)")
        bottom.set_xlabel("concurrency (requests in flight)")
        bottom.set_ylim(bottom=0)
        bottom.grid(True, alpha=0.3)
        bottom.legend(loc="upper left")
        if xs and min(xs) > 0:
            bottom.set_xscale("log", base=2)
            bottom.set_xticks(xs, [str(x) for x in xs])
        fig.tight_layout()
        fig.savefig(path, dpi=120, format="png")
    finally:
        plt.close(fig)
