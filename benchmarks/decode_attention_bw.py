#!/usr/bin/env python3
"""How close the native decode-attention kernel runs to this machine's memory bandwidth.

A decode step reads every running sequence's whole K/V cache once, and on a 2-core CPU that
read, not the arithmetic, bounds the step. This times ``pagedllm::paged_attention_decode`` over
``--layers`` separate caches (one per layer, so the data cannot stay in the last-level cache
between calls, as in the engine) for a batch of ``--batch`` sequences of ``--context`` tokens,
with block tables scattered at random over the pool and laid out in order, and compares the
bytes it reads per second with a plain streaming read (``torch.sum`` over 1 GiB, every core).

  .venv/bin/python benchmarks/decode_attention_bw.py
  .venv/bin/python benchmarks/decode_attention_bw.py --batch 64 --context 1000 --dtype float32
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

from pagedllm.entrypoints.bench.report import write_json  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=196, help="sequences per decode step")
    parser.add_argument("--context", type=int, default=300, help="tokens of context each")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--num-heads", type=int, default=9)
    parser.add_argument("--num-kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--isa",
        default=None,
        help="whose decode kernel: avx2, avx512, avx512bf16, amx (default: the best)",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--stream-mib", type=int, default=1024, help="size of the streaming read")
    parser.add_argument("--output-json", default=None)
    return parser.parse_args(argv)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stream_read_gbps(mib: int, repeats: int) -> float:
    import torch

    x = torch.ones((mib << 20) // 4, dtype=torch.float32)
    return x.numel() * 4 / median_seconds(x.sum, repeats) / 1e9


def kernel_gbps(args: argparse.Namespace, layout: str, ops: Any) -> dict[str, float]:
    import torch

    dtype = getattr(torch, args.dtype)
    bs, d, hk = args.block_size, args.head_dim, args.num_kv_heads
    per_seq = -(-args.context // bs)
    num_blocks = args.batch * per_seq
    gen = torch.Generator().manual_seed(0)
    caches = [
        (
            torch.randn(num_blocks, hk, d, bs, generator=gen).to(dtype),
            torch.randn(num_blocks, hk, bs, d, generator=gen).to(dtype),
        )
        for _ in range(args.layers)
    ]
    if layout == "scattered":
        ids = torch.randperm(num_blocks, generator=gen)
    else:
        ids = torch.arange(num_blocks)
    tables = ids.view(args.batch, per_seq).contiguous()
    seq_lens = torch.full((args.batch,), args.context, dtype=torch.int64)
    q = torch.randn(args.batch, args.num_heads, d, generator=gen).to(dtype)
    scale = d**-0.5

    def step() -> None:
        for k_cache, v_cache in caches:
            ops.paged_attention_decode(q, k_cache, v_cache, tables, seq_lens, scale, args.context)

    seconds = median_seconds(step, args.repeats)
    kv_bytes = args.layers * args.batch * args.context * hk * d * 2 * caches[0][0].element_size()
    return {"step_ms": seconds * 1e3, "kv_gb": kv_bytes / 1e9, "gbps": kv_bytes / seconds / 1e9}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from pagedllm.model_executor.ops import native_ops, runnable_isas

    torch.set_num_threads(args.threads)
    isa = args.isa or (runnable_isas() or ("none",))[0]
    if native_ops(isa) is None:
        print(f"error: the {isa} kernels are not built (make setup)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "args": vars(args),
        "stream_read_gbps": stream_read_gbps(args.stream_mib, 5),
    }
    print(
        f"{args.batch} sequences x {args.context} tokens, {args.layers} layers, {args.dtype}, "
        f"{args.threads} threads, the {isa} kernel"
    )
    print(
        f"streaming read (torch.sum over {args.stream_mib} MiB): "
        f"{results['stream_read_gbps']:.1f} GB/s"
    )
    for layout in ("scattered", "in order"):
        r = kernel_gbps(args, layout, native_ops(isa))
        r["fraction_of_stream"] = r["gbps"] / results["stream_read_gbps"]
        results[layout.replace(" ", "_")] = r
        print(
            f"decode attention, blocks {layout:9s}: {r['step_ms']:7.2f} ms per step for "
            f"{r['kv_gb']:.2f} GB of K/V = {r['gbps']:5.1f} GB/s "
            f"({100 * r['fraction_of_stream']:.0f}% of the streaming read)"
        )
    if args.output_json:
        write_json(args.output_json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
