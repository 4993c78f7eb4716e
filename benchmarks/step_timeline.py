#!/usr/bin/env python3
"""Where an offline run's time goes, step by step.

Runs a workload as ``pagedllm bench throughput`` does (every request at once, greedy,
ignore_eos) and times each model step. Steps that carry prompt tokens (prefill chunks, with the
running requests' decodes riding along) and decode-only steps are summed apart, and the
decode-only step times are fitted by least squares to

    step_ms = fixed + per_seq * sequences + per_1k_ctx * (context tokens read) / 1000

which splits the decode time into a per-step cost (reading the weights, launching ~15 ops per
layer), a per-sequence cost (the matmul rows) and a per-context-token cost (reading the KV
cache); the last, with the cache's bytes per token, is the rate the attention reads the cache at.
In one run the batch and its context grow and shrink together, so the split between the last two
is loose (two bf16 runs of the shared workload: 3.4 + 11.9 s and 5.3 + 9.2 s); their sum and the
per-step part are stable. ``benchmarks/decode_attention_bw.py`` measures the read rate directly.

  .venv/bin/python benchmarks/step_timeline.py --dataset ../shared/peers/workload.jsonl \\
      --max-model-len 2048 [--dtype float32] [--output-json steps.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing pagedllm

from pagedllm.entrypoints.bench.datasets import load_jsonl_dataset  # noqa: E402
from pagedllm.entrypoints.bench.offline import (  # noqa: E402
    engine_prompt,
    exact_params,
    load_llm,
)
from pagedllm.entrypoints.bench.report import write_json  # noqa: E402
from pagedllm.entrypoints.engine_cli_args import (  # noqa: E402
    add_engine_args,
    engine_args_from_namespace,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True, help="a JSONL workload (prompt, output_len)")
    parser.add_argument("--num-prompts", type=int, default=None, help="only the first N")
    parser.add_argument("--output-json", default=None)
    add_engine_args(parser)
    return parser.parse_args(argv)


def decode_context(out: Any) -> int:
    """Context tokens the step's decodes read (one new token each, drafts aside; a prompt's
    last chunk of one token counts too, a negligible overcount)."""
    total = 0
    for c in out.cached_requests:
        n = out.num_scheduled_tokens[c.req_id] - len(out.spec_token_ids.get(c.req_id, ()))
        if n == 1:
            total += c.num_computed_tokens + 1
    return total


def record_steps(runner: Any) -> list[dict[str, float]]:
    """Wrap ``runner.execute_model`` to log each step's shape and duration."""
    steps: list[dict[str, float]] = []
    execute = runner.execute_model

    def timed(scheduler_output):
        start = time.perf_counter()
        out = execute(scheduler_output)
        seconds = time.perf_counter() - start
        steps.append(
            {
                "seconds": seconds,
                "decodes": scheduler_output.num_decodes,
                "prefill_tokens": scheduler_output.num_prefill_tokens,
                "decode_context": decode_context(scheduler_output),
            }
        )
        return out

    runner.execute_model = timed
    return steps


def decode_only(steps: list[dict[str, float]]) -> list[dict[str, float]]:
    return [s for s in steps if s["prefill_tokens"] == 0 and s["decodes"] > 0]


def fit_decode_steps(steps: list[dict[str, float]]) -> dict[str, float] | None:
    """Least squares over decode-only steps: ms = fixed + per_seq * B + per_1k_ctx * ctx / 1e3."""
    import numpy as np

    rows = decode_only(steps)
    if len(rows) < 4:
        return None
    x = np.array([[1.0, s["decodes"], s["decode_context"] / 1e3] for s in rows])
    y = np.array([s["seconds"] * 1e3 for s in rows])
    (fixed, per_seq, per_1k), *_ = np.linalg.lstsq(x, y, rcond=None)
    return {
        "fixed_ms": float(fixed),
        "per_seq_ms": float(per_seq),
        "per_1k_ctx_ms": float(per_1k),
        "fixed_s": float(fixed * len(rows) / 1e3),
        "per_seq_s": float(per_seq * x[:, 1].sum() / 1e3),
        "context_s": float(per_1k * x[:, 2].sum() / 1e3),
    }


def summarize(steps: list[dict[str, float]], wall_s: float) -> dict[str, Any]:
    prefill = [s for s in steps if s["prefill_tokens"] > 0]
    decode = decode_only(steps)
    return {
        "wall_s": wall_s,
        "prefill_steps": len(prefill),
        "prefill_s": sum(s["seconds"] for s in prefill),
        "decode_steps": len(decode),
        "decode_s": sum(s["seconds"] for s in decode),
        "outside_model_s": wall_s - sum(s["seconds"] for s in steps),
        "decode_context_tokens": sum(s["decode_context"] for s in steps),
        "decode_fit": fit_decode_steps(steps),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine_args = engine_args_from_namespace(args)
    requests = load_jsonl_dataset(args.dataset, args.num_prompts)
    llm, _ = load_llm(engine_args)
    runner = llm.engine.runner
    llm.generate([engine_prompt(r) for r in requests[:2]], exact_params(8), use_tqdm=False)
    steps = record_steps(runner)
    start = time.perf_counter()
    llm.generate(
        [engine_prompt(r) for r in requests],
        [exact_params(r.output_len) for r in requests],
        use_tqdm=False,
    )
    wall = time.perf_counter() - start
    result = summarize(steps, wall)
    output_tokens = sum(r.output_len for r in requests)
    kv_bytes_per_token = runner.kv_bytes_per_block(runner.block_size) / runner.block_size
    print(f"{len(requests)} requests, {output_tokens} output tokens in {wall:.2f} s")
    print(f"  {result['prefill_steps']} steps with prompt tokens: {result['prefill_s']:.2f} s")
    print(f"  {result['decode_steps']} decode-only steps:         {result['decode_s']:.2f} s")
    print(f"  outside the model (schedule, outputs):  {result['outside_model_s']:.2f} s")
    fit = result["decode_fit"]
    if fit is not None:
        rate = kv_bytes_per_token * 1e3 / (fit["per_1k_ctx_ms"] * 1e-3) / 1e9
        fit["kv_read_gbps"] = rate
        print(
            f"  decode step ~ {fit['fixed_ms']:.1f} ms + {fit['per_seq_ms']:.3f} ms/sequence + "
            f"{fit['per_1k_ctx_ms']:.3f} ms per 1K context tokens"
        )
        print(
            f"    = {fit['fixed_s']:.1f} s per-step + {fit['per_seq_s']:.1f} s per-sequence + "
            f"{fit['context_s']:.1f} s reading {kv_bytes_per_token:.0f} B/token of KV "
            f"({rate:.1f} GB/s)"
        )
    if args.output_json:
        write_json(args.output_json, {"summary": result, "steps": steps})
    return 0


if __name__ == "__main__":
    sys.exit(main())
