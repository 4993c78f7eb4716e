#!/usr/bin/env python3
"""The model's projections in bf16, as a decode or prefill step runs them: the native AMX kernel
(``amx_linear``) against oneDNN's packed GEMM, at several row counts.

Each of 30 layers has its own weights (qkv 960x576, gate/up 3072x576, down 576x1536, o 576x576,
SmolLM2-135M's shapes) and the lm_head (49152x576) comes last, so, as in the engine, every weight
is read from memory rather than from a cache that a repeated single matmul would keep warm. Prints
the median time of one pass over all 121 projections per row count; the engine switches between
the two at ``AMX_LINEAR_MAX_ROWS``.

  .venv/bin/python benchmarks/linear_rate.py [--rows 16 96 208 528 1024 2048] [--repeats 9]
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
    AMX_LINEAR_MAX_ROWS,
    PACK_BATCH_HINT,
    pack_amx,
)
from pagedllm.model_executor.ops import native_ops  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 96, 208, 528, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    ops = native_ops("amx")
    if ops is None or not ops.amx_supported:
        print("amx_linear needs a CPU with AMX-BF16 and the amx kernels built")
        return 1
    torch.manual_seed(0)
    weights = random_weights(torch.bfloat16)
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT) for w in weights]
    tiles = [pack_amx(w) for w in weights]
    mb = sum(w.numel() for w in weights) * 2 / 1e6
    print(f"{len(weights)} projections, {mb:.0f} MB of bf16 weights")
    print(f"{'rows':>6} {'amx_linear ms':>14} {'oneDNN ms':>10} {'ratio':>6}")

    def amx(xs: dict[int, torch.Tensor]) -> None:
        for w in tiles:
            ops.amx_linear(xs[w.shape[1] * 32], w)

    def dnnl(xs: dict[int, torch.Tensor]) -> None:
        for w, t in zip(onednn, tiles):
            torch.ops.mkldnn._linear_pointwise(xs[t.shape[1] * 32], w, None, "none", [], "")

    for rows in args.rows:
        xs = {i: torch.randn(rows, i).to(torch.bfloat16) for i in INPUT_WIDTHS}
        times: dict[str, list[float]] = {"amx": [], "dnnl": []}
        for _ in range(args.repeats):  # alternated, so drift hits both alike
            for name, fn in (("amx", amx), ("dnnl", dnnl)):
                t0 = time.perf_counter()
                fn(xs)
                times[name].append((time.perf_counter() - t0) * 1e3)
        a, d = statistics.median(times["amx"]), statistics.median(times["dnnl"])
        mark = " (engine: amx_linear)" if rows <= AMX_LINEAR_MAX_ROWS else " (engine: oneDNN)"
        print(f"{rows:>6} {a:>14.1f} {d:>10.1f} {d / a:>6.2f}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
