#!/usr/bin/env python3
"""The model's projections at decode-sized steps: the native ``small_linear`` (row-major weight,
fp32 or bf16) against oneDNN's packed fp32 GEMM, at several row counts, per ISA.

Each of 30 layers has its own weights (qkv 960x576, gate/up 3072x576, down 576x1536, o 576x576,
SmolLM2-135M's shapes) and the lm_head (49152x576) comes last, so, as in the engine, every weight
is read from memory. The two are timed alternately, pass by pass; prints the median time of one
pass over all 121 projections and the rate the weights stream at. The engine switches between
them at ``SMALL_LINEAR_MAX_ROWS``. With ``--weights bf16`` small_linear reads bf16 weights
(widened in registers: what a bf16 model runs on a CPU without bf16 dot products) against the
widened fp32 copy oneDNN runs there.

  .venv/bin/python benchmarks/small_linear_rate.py [--isa avx512] [--rows 1 4 16 32]
      [--weights fp32|bf16] [--repeats 9]
(For the AVX2 ISA, hold oneDNN to AVX2 as well: ONEDNN_MAX_CPU_ISA=AVX2.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing pagedllm

from benchmarks.model_shapes import INPUT_WIDTHS, random_weights  # noqa: E402
from pagedllm.model_executor.backends.linear import (  # noqa: E402
    PACK_BATCH_HINT,
    SMALL_LINEAR_MAX_ROWS,
)
from pagedllm.model_executor.ops import native_ops, runnable_isas  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", default=None, help="default: the best this CPU runs")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 24, 32])
    ap.add_argument("--weights", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    isa = args.isa or next(iter(runnable_isas()), None)
    ops = native_ops(isa) if isa else None
    if ops is None:
        print(f"the {isa} kernels are not built or cannot run here")
        return 1
    torch.manual_seed(0)
    wdtype = torch.float32 if args.weights == "fp32" else torch.bfloat16
    weights = random_weights(wdtype)
    packed = [torch.ops.mkldnn._reorder_linear_weight(w.float(), PACK_BATCH_HINT) for w in weights]
    mb = sum(w.numel() * w.element_size() for w in weights) / 1e6
    print(f"{isa}: {len(weights)} projections, {mb:.0f} MB of {args.weights} weights")
    print(f"(the engine runs small_linear up to {SMALL_LINEAR_MAX_ROWS} rows)")
    print(f"{'rows':>5} {'small_linear ms':>16} {'GB/s':>6} {'oneDNN ms':>10} {'ratio':>6}")
    for rows in args.rows:
        xs = {k: torch.randn(rows, k) for k in INPUT_WIDTHS}

        def small(xs: dict[int, torch.Tensor] = xs) -> None:
            for w in weights:
                ops.small_linear(xs[w.shape[1]], w)

        def onednn(xs: dict[int, torch.Tensor] = xs) -> None:
            for p, w in zip(packed, weights):
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")

        times: dict[str, list[float]] = {"small": [], "onednn": []}
        for _ in range(args.repeats):
            for name, fn in (("small", small), ("onednn", onednn)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        s, o = statistics.median(times["small"]), statistics.median(times["onednn"])
        print(f"{rows:>5} {s * 1e3:>16.1f} {mb / 1e3 / s:>6.1f} {o * 1e3:>10.1f} {o / s:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
