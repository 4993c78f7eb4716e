"""``pagedllm bench throughput``: offline throughput, measured as ``vllm bench throughput`` and
the peers' offline script do it.

Every request is submitted at once in one ``LLM.generate`` call, greedy with ignore_eos so each
yields exactly its ``output_len`` tokens. Only that call is timed; model loading and a few
warm-up requests are reported separately.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import Any

from pagedllm.entrypoints.bench.datasets import (
    RANDOM_DATASET,
    BenchRequest,
    load_jsonl_dataset,
    random_token_requests,
)
from pagedllm.entrypoints.bench.offline import (
    CpuWatch,
    engine_prompt,
    exact_params,
    load_llm,
    model_shape,
    prompt_vocab_size,
    useful_flops,
)
from pagedllm.entrypoints.bench.report import print_table, write_json
from pagedllm.entrypoints.engine_cli_args import add_engine_args, engine_args_from_namespace

DEFAULT_RANDOM_NUM_PROMPTS = 100


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default=RANDOM_DATASET,
        help="a JSONL workload file (prompt, output_len[, prompt_len] per line) or 'random'",
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="first N requests of the file (default: all), or N random ones "
        f"(default {DEFAULT_RANDOM_NUM_PROMPTS})",
    )
    parser.add_argument("--input-len", type=int, default=256, help="random dataset: prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="random dataset: output tokens")
    parser.add_argument(
        "--num-warmup-requests",
        type=int,
        default=2,
        help="untimed 8-token requests run first (as the peers' script does)",
    )
    parser.add_argument(
        "--peak-gflops",
        type=float,
        default=None,
        help="the machine's GEMM rate (benchmarks/gemm_rate.py) to report the "
        "fraction of it reached",
    )
    parser.add_argument("--output-json", default=None, help="write the results here")
    parser.add_argument("--disable-tqdm", action="store_true")
    add_engine_args(parser)


def run(ns: argparse.Namespace) -> int:
    if ns.num_warmup_requests < 0:
        raise ValueError(
            f"--num-warmup-requests must be non-negative, got {ns.num_warmup_requests}"
        )
    engine_args = engine_args_from_namespace(ns)  # validate the flags before the slow load
    requests: list[BenchRequest] | None = None
    if ns.dataset != RANDOM_DATASET:  # a bad file fails before the model loads
        requests = load_jsonl_dataset(ns.dataset, ns.num_prompts)
    llm, load_s = load_llm(engine_args)
    if requests is None:
        num = ns.num_prompts if ns.num_prompts is not None else DEFAULT_RANDOM_NUM_PROMPTS
        requests = random_token_requests(
            num, ns.input_len, ns.output_len, prompt_vocab_size(llm), ns.seed
        )
    prompts = [engine_prompt(r) for r in requests]
    params = [exact_params(r.output_len) for r in requests]

    warmup = prompts[: ns.num_warmup_requests]
    if warmup:
        llm.generate(warmup, exact_params(8), use_tqdm=False)

    with CpuWatch() as watch:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=not ns.disable_tqdm)
        elapsed = time.perf_counter() - start

    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    expected_output = sum(r.output_len for r in requests)
    result: dict[str, Any] = {
        "engine": "pagedllm",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": ns.dataset,
        "num_requests": len(outputs),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "expected_output_tokens": expected_output,
        "elapsed_s": elapsed,
        "requests_per_s": len(outputs) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
        "load_s": load_s,
        "num_warmup_requests": len(warmup),
        **watch.as_dict(elapsed),
        "engine_args": asdict(engine_args),
    }
    shape = model_shape(llm)
    if shape is not None:
        pairs = zip(outputs, requests, strict=True)
        lengths = [(len(o.prompt_token_ids), r.output_len) for o, r in pairs]
        result["achieved_gflops"] = useful_flops(shape, lengths) / elapsed / 1e9
        if ns.peak_gflops:
            result["peak_gflops"] = ns.peak_gflops
            result["fraction_of_peak"] = result["achieved_gflops"] / ns.peak_gflops

    print_table("Offline Throughput", _rows(result))
    if output_tokens != expected_output:
        print(f"warning: {output_tokens} output tokens, the dataset asked for {expected_output}")
    if ns.output_json:
        write_json(ns.output_json, result)
    return 0


def _rows(result: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("Requests", result["num_requests"]),
        ("Prompt tokens", result["prompt_tokens"]),
        ("Output tokens", result["output_tokens"]),
        ("Wall time of generate (s)", result["elapsed_s"]),
        ("Model load time (s)", result["load_s"]),
        ("Request throughput (req/s)", result["requests_per_s"]),
        ("Output token throughput (tok/s)", result["output_tokens_per_s"]),
        ("Total token throughput (tok/s)", result["total_tokens_per_s"]),
        ("Own CPU use (cores)", result["own_cpu_util_cores"]),
    ]
    if "achieved_gflops" in result:
        rows.append(("Useful GFLOP/s", result["achieved_gflops"]))
    if "fraction_of_peak" in result:
        rows.append(("Fraction of GEMM peak", result["fraction_of_peak"]))
    return rows
