"""``pagedllm bench latency``: how long one batch takes end to end (``vllm bench latency``).

A batch of ``--batch-size`` random prompts of ``--input-len`` tokens generates ``--output-len``
tokens each; the whole batch is timed ``--num-iters`` times after ``--num-iters-warmup``
untimed runs. Each iteration draws fresh prompts, so the prefix cache cannot turn later
prefills into cache hits and every iteration does the same work.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import Any

from tqdm.auto import tqdm

from pagedllm.entrypoints.bench.datasets import random_token_requests
from pagedllm.entrypoints.bench.metrics import LatencySummary
from pagedllm.entrypoints.bench.offline import (
    CpuWatch,
    engine_prompt,
    exact_params,
    load_llm,
    prompt_vocab_size,
)
from pagedllm.entrypoints.bench.report import print_table, write_json
from pagedllm.entrypoints.engine_cli_args import add_engine_args, engine_args_from_namespace


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters-warmup", type=int, default=2)
    parser.add_argument("--num-iters", type=int, default=10)
    parser.add_argument("--output-json", default=None, help="write the results here")
    parser.add_argument("--disable-tqdm", action="store_true")
    add_engine_args(parser)


def run(ns: argparse.Namespace) -> int:
    if ns.num_iters < 1 or ns.num_iters_warmup < 0:
        raise ValueError("--num-iters must be at least 1 and --num-iters-warmup non-negative")
    engine_args = engine_args_from_namespace(ns)
    # Validates --batch-size / --input-len / --output-len before the slow load.
    random_token_requests(ns.batch_size, ns.input_len, ns.output_len, 1)
    llm, load_s = load_llm(engine_args)
    vocab = prompt_vocab_size(llm)
    params = exact_params(ns.output_len)

    def one_batch(iteration: int) -> float:
        batch = random_token_requests(
            ns.batch_size, ns.input_len, ns.output_len, vocab, seed=ns.seed + iteration
        )
        prompts = [engine_prompt(r) for r in batch]
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    total = ns.num_iters_warmup + ns.num_iters
    for i in tqdm(range(ns.num_iters_warmup), desc="Warmup", disable=ns.disable_tqdm):
        one_batch(i)
    with CpuWatch() as watch:
        latencies = [
            one_batch(i)
            for i in tqdm(
                range(ns.num_iters_warmup, total), desc="Iterations", disable=ns.disable_tqdm
            )
        ]
    stats = LatencySummary.of(latencies)
    result: dict[str, Any] = {
        "engine": "pagedllm",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "batch_size": ns.batch_size,
        "input_len": ns.input_len,
        "output_len": ns.output_len,
        "num_iters": ns.num_iters,
        "num_iters_warmup": ns.num_iters_warmup,
        "latencies_s": latencies,
        "avg_latency_s": stats.mean,
        "percentiles_s": {str(p): v for p, v in stats.percentiles.items()},
        # Per sequence: the batch latency spread over its output positions (prefill included).
        "ms_per_output_token": stats.mean * 1000.0 / ns.output_len,
        "output_tokens_per_s": ns.batch_size * ns.output_len / stats.mean,
        "load_s": load_s,
        **watch.as_dict(sum(latencies)),
        "engine_args": asdict(engine_args),
    }
    print_table(
        "Latency",
        [
            ("Batch size x input x output", f"{ns.batch_size}x{ns.input_len}x{ns.output_len}"),
            ("Avg latency (s)", stats.mean),
            ("P50 latency (s)", stats.percentiles[50]),
            ("P90 latency (s)", stats.percentiles[90]),
            ("P99 latency (s)", stats.percentiles[99]),
            ("ms per output token (per sequence)", result["ms_per_output_token"]),
            ("Batch output tokens/s", result["output_tokens_per_s"]),
            ("Model load time (s)", load_s),
        ],
    )
    if ns.output_json:
        write_json(ns.output_json, result)
    return 0
