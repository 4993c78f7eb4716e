#!/usr/bin/env python3
"""--quantization gguf's matmuls against the dense bf16 ones, on the real default model: every
projection of SmolLM2-135M's Q4_1 file (q|k|v and gate|up stacked as the engine stacks them,
and the Q8_0 embedding table as the tied lm_head) through ``quant_linear``, against the same
weights decoded to bf16 and packed for oneDNN (what the engine runs without the flag), at
several row counts. All 121 projections per pass, so the weights come from memory as in the
engine. Prints the median time of one pass and the ratio (quantized / dense).

  .venv/bin/python benchmarks/gguf_linear_rate.py [--rows 1 8 16 24 64 256 2048] [--isa avx512bf16]
      [--dtype bfloat16|float32] [--repeats 7]
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

from pagedllm.cpu_info import cpu_model  # noqa: E402
from pagedllm.model_executor.backends.linear import PACK_BATCH_HINT  # noqa: E402
from pagedllm.model_executor.layers.quant_tensor import row_segments  # noqa: E402
from pagedllm.model_executor.loader import ensure_default_model  # noqa: E402
from pagedllm.model_executor.loader.gguf_weights import iter_gguf_weights  # noqa: E402
from pagedllm.model_executor.ops import native_ops  # noqa: E402
from pagedllm.model_executor.ops.loader import runnable_isas  # noqa: E402

STACKS = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2)}
STACKS |= {"gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1)}


def projections(path: str) -> list:
    """Each projection's GGUF segments, in the engine's order (lm_head last)."""
    stacked: dict[str, dict[int, object]] = {}
    single: list = []
    table = None
    for name, t in iter_gguf_weights(path, keep_quantized=True):
        if isinstance(t, torch.Tensor):
            continue  # norms: not matmuls
        leaf = name.split(".")[-2]
        if name == "model.embed_tokens.weight":
            table = t
        elif leaf in STACKS:
            key, idx = STACKS[leaf]
            stacked.setdefault(f"{name.split('.')[2]}.{key}", {})[idx] = t
        else:
            single.append([t])
    out = [row_segments([parts[i] for i in sorted(parts)]) for parts in stacked.values()]
    return [*out, *single, [table]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 24, 64, 256, 2048])
    ap.add_argument("--isa", default=runnable_isas()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    ops = native_ops(args.isa)
    dtype = getattr(torch, args.dtype)
    projs = projections(ensure_default_model())
    dense = []
    for segs in projs:
        w = torch.cat([s.dequantize() for s in segs]).to(dtype)
        dense.append(torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT))
    print(f"{cpu_model()}, {args.isa}, {args.dtype}, {len(projs)} projections")
    for m in args.rows:
        xs = {segs[0].cols: torch.randn(m, segs[0].cols).to(dtype) for segs in projs}

        def quantized(xs=xs):
            for segs in projs:
                x = xs[segs[0].cols]
                for s in segs:
                    ops.quant_linear(x, s.data, int(s.qtype))

        def packed(xs=xs):
            for segs, w in zip(projs, dense):
                torch.ops.mkldnn._linear_pointwise(xs[segs[0].cols], w, None, "none", [], "")

        times = {}
        for fn in (quantized, packed) * 2:  # alternated
            fn()
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                times.setdefault(fn.__name__, []).append(time.perf_counter() - t0)
        q, d = (statistics.median(times[k]) * 1e3 for k in ("quantized", "packed"))
        print(f"rows {m:5d}: gguf {q:8.2f} ms   bf16-packed {d:8.2f} ms   ratio {q / d:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
