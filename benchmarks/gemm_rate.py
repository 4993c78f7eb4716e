#!/usr/bin/env python3
"""This machine's GEMM rate in fp32 and bf16: the compute ceiling every engine here lives under.

A 135M-parameter model on a CPU is bound by its matrix multiplies, so the best tokens/s any
engine can reach is about (GEMM GFLOP/s) / (GFLOPs per token). This measures torch's matmul on
the model's own shapes, ``[M x 576] @ [576 x 1536]`` and ``[M x 1536] @ [1536 x 576]`` for
M = 16 .. 2048 rows (a decode batch to a full prefill chunk), plus one large square GEMM, with
every core, taking the median of repeats. It prints a table, the peak per dtype, and the
resulting ceiling for SmolLM2-135M; ``--output-json`` writes them.

  .venv/bin/python benchmarks/gemm_rate.py --output-json gemm.json
  pagedllm bench throughput ... --peak-gflops <peak from here>
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing pagedllm

from pagedllm.entrypoints.bench.flops import SMOLLM2_135M, flops_per_token  # noqa: E402
from pagedllm.entrypoints.bench.report import write_json  # noqa: E402

HIDDEN, INTERMEDIATE = SMOLLM2_135M.hidden_size, SMOLLM2_135M.intermediate_size
CEILING_CONTEXT_LEN = 512  # a typical context in the workload, for the attention term


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", default="16,64,256,512,1024,2048", help="comma-separated M (tokens per matmul)"
    )
    parser.add_argument(
        "--square", type=int, default=2048, help="size of the square GEMM (0: skip)"
    )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--min-time",
        type=float,
        default=0.1,
        help="seconds each repeat runs (matmuls are looped to fill it)",
    )
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--disable-tqdm", action="store_true")
    return parser.parse_args(argv)


def shapes(rows: list[int], square: int) -> list[tuple[str, int, int, int]]:
    """(label, M, K, N) for A[M x K] @ B[K x N]."""
    out = []
    for m in rows:
        out.append((f"[{m}x{HIDDEN}]@[{HIDDEN}x{INTERMEDIATE}]", m, HIDDEN, INTERMEDIATE))
        out.append((f"[{m}x{INTERMEDIATE}]@[{INTERMEDIATE}x{HIDDEN}]", m, INTERMEDIATE, HIDDEN))
    if square:
        out.append((f"[{square}]^3 square", square, square, square))
    return out


def gemm_gflops(m: int, k: int, n: int, dtype: Any, repeats: int, min_time: float) -> list[float]:
    """GFLOP/s of ``repeats`` timed runs, each looping the matmul for about ``min_time`` s."""
    import torch

    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    for _ in range(3):  # warm-up: thread pool, kernel selection, caches
        torch.matmul(a, b, out=out)
    start = time.perf_counter()
    torch.matmul(a, b, out=out)
    once = max(time.perf_counter() - start, 1e-7)
    loops = max(1, int(min_time / once))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            torch.matmul(a, b, out=out)
        elapsed = time.perf_counter() - start
        rates.append(2.0 * m * k * n * loops / elapsed / 1e9)
    return rates


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        rows = [int(x) for x in ns.rows.split(",") if x.strip()]
        dtype_names = [d.strip() for d in ns.dtypes.split(",") if d.strip()]
        if not rows or min(rows) < 1 or ns.repeats < 1 or ns.threads < 1 or ns.min_time <= 0:
            raise ValueError("--rows, --repeats, --threads and --min-time must be positive")
        if set(dtype_names) - {"float32", "bfloat16", "float16"}:
            raise ValueError(f"--dtypes must name float32, bfloat16 or float16, got {ns.dtypes}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(ns.threads)
    jobs = [(s, d) for d in dtype_names for s in shapes(rows, ns.square)]
    results = []
    for (label, m, k, n), dtype_name in tqdm(jobs, desc="GEMMs", disable=ns.disable_tqdm):
        rates = gemm_gflops(m, k, n, getattr(torch, dtype_name), ns.repeats, ns.min_time)
        results.append(
            {
                "shape": label,
                "m": m,
                "k": k,
                "n": n,
                "dtype": dtype_name,
                "median_gflops": statistics.median(rates),
                "best_gflops": max(rates),
            }
        )

    print(f"{'shape':<28}{'dtype':>10}{'median GFLOP/s':>16}{'best':>10}")
    for r in results:
        print(
            f"{r['shape']:<28}{r['dtype']:>10}{r['median_gflops']:>16.1f}{r['best_gflops']:>10.1f}"
        )
    per_token = flops_per_token(SMOLLM2_135M, CEILING_CONTEXT_LEN)
    peak = {d: max(r["median_gflops"] for r in results if r["dtype"] == d) for d in dtype_names}
    ceiling = {d: p * 1e9 / per_token for d, p in peak.items()}
    for d in dtype_names:
        print(
            f"peak {d}: {peak[d]:.1f} GFLOP/s -> SmolLM2-135M ceiling ~{ceiling[d]:.0f} tok/s "
            f"({per_token / 1e6:.0f} MFLOP/token at context {CEILING_CONTEXT_LEN})"
        )
    if ns.output_json:
        write_json(
            ns.output_json,
            {
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "threads": ns.threads,
                "ncpu": os.cpu_count(),
                "repeats": ns.repeats,
                "results": results,
                "peak_gflops": peak,
                "smollm2_flops_per_token": per_token,
                "smollm2_ceiling_tokens_per_s": ceiling,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
