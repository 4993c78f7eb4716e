"""``pagedllm bench serve``: a load generator for any OpenAI-compatible server.

Like ``vllm bench serve``: requests stream from one connection pool sized to the concurrency,
arrive all at once or as a seeded Poisson process, and are capped at ``--max-concurrency`` in
flight. Each request records TTFT, every inter-chunk gap (ITL), TPOT and end-to-end latency;
the report gives throughput, their distributions, and goodput under an SLO.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm.auto import tqdm

from pagedllm.entrypoints.bench.arrivals import arrival_offsets
from pagedllm.entrypoints.bench.datasets import (
    RANDOM_DATASET,
    BenchRequest,
    load_jsonl_dataset,
    random_text_requests,
)
from pagedllm.entrypoints.bench.metrics import LatencySummary, count_good, ms, parse_goodput
from pagedllm.entrypoints.bench.openai_client import (
    COMPLETIONS,
    ENDPOINTS,
    ApiTarget,
    RequestResult,
    fetch_model_id,
    send_request,
)
from pagedllm.entrypoints.bench.report import print_table, write_json


@dataclass(frozen=True)
class LoadOptions:
    """How the load is applied (the target server is an ``ApiTarget``)."""

    max_concurrency: int | None = None  # None: no cap
    request_rate: float = math.inf
    seed: int = 0
    num_warmups: int = 0
    timeout_s: float = 600.0
    api_key: str | None = None
    disable_tqdm: bool = False
    slo_ms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")
        if self.num_warmups < 0:
            raise ValueError(f"--num-warmups must be non-negative, got {self.num_warmups}")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout must be positive, got {self.timeout_s}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def add_client_args(
    parser: argparse.ArgumentParser,
    model_help: str = "model name to send (default: the first one GET /v1/models lists)",
) -> None:
    """Flags shared by ``bench serve`` and ``bench sweep`` (everything but the concurrency)."""
    parser.add_argument("--endpoint", default=COMPLETIONS, choices=ENDPOINTS)
    parser.add_argument("--model", default=None, help=model_help)
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--dataset",
        default=RANDOM_DATASET,
        help="a JSONL workload file (prompt, output_len[, prompt_len] per line) or 'random'",
    )
    parser.add_argument(
        "--input-len",
        type=int,
        default=256,
        help="random dataset: words per prompt (about one token each)",
    )
    parser.add_argument(
        "--output-len", type=int, default=128, help="random dataset: tokens to generate per request"
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="mean requests/s, Poisson arrivals (default inf: all at once)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the dataset and arrivals")
    parser.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send ignore_eos so every request yields output_len tokens "
        "(vLLM and pagedllm honour it; with llama.cpp check the generated-token total)",
    )
    parser.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="NAME:MS",
        help="SLO for goodput, e.g. ttft:500 tpot:100 (names: ttft, tpot, e2el)",
    )
    parser.add_argument(
        "--num-warmups", type=int, default=0, help="untimed requests sent one by one before the run"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    parser.add_argument("--disable-tqdm", action="store_true")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="server root, without /v1"
    )
    add_client_args(parser)
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="most requests in flight (default: no cap)",
    )
    parser.add_argument("--output-json", default=None, help="write the results here")
    parser.add_argument(
        "--save-detailed",
        action="store_true",
        help="also write per-request figures into --output-json",
    )


def load_serve_dataset(ns: argparse.Namespace, num_prompts: int) -> list[BenchRequest]:
    if ns.dataset == RANDOM_DATASET:
        return random_text_requests(num_prompts, ns.input_len, ns.output_len, ns.seed)
    return load_jsonl_dataset(ns.dataset, num_prompts)


def options_from_namespace(ns: argparse.Namespace, max_concurrency: int | None) -> LoadOptions:
    return LoadOptions(
        max_concurrency=max_concurrency,
        request_rate=ns.request_rate,
        seed=ns.seed,
        num_warmups=ns.num_warmups,
        timeout_s=ns.timeout,
        api_key=ns.api_key,
        disable_tqdm=ns.disable_tqdm,
        slo_ms=parse_goodput(ns.goodput),
    )


def resolve_target(
    ns: argparse.Namespace, base_url: str, model: str | None, options: LoadOptions
) -> ApiTarget:
    """The target; with no model name given, the first one the server lists."""
    if model is None:
        model = asyncio.run(_fetch_model(base_url, options))
    return ApiTarget(base_url, ns.endpoint, model, ignore_eos=ns.ignore_eos)


async def _fetch_model(base_url: str, options: LoadOptions) -> str:
    async with httpx.AsyncClient(timeout=30.0) as client:
        return await fetch_model_id(client, base_url, options.headers)


async def run_load(
    target: ApiTarget, requests: list[BenchRequest], options: LoadOptions
) -> tuple[list[RequestResult], float]:
    """Send every request; -> (results in dataset order, duration in seconds)."""
    limit = options.max_concurrency or max(1, len(requests))
    client = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        timeout=httpx.Timeout(options.timeout_s, connect=min(30.0, options.timeout_s)),
    )
    headers = options.headers
    async with client:
        # Prompts of their own: warming up on the dataset's would prefix-cache them.
        warmups = random_text_requests(options.num_warmups, 16, 8, seed=options.seed + 1)
        for request in warmups:
            await send_request(client, target, request, headers)
        semaphore = asyncio.Semaphore(limit)
        offsets = arrival_offsets(len(requests), options.request_rate, options.seed)
        bar = tqdm(total=len(requests), desc="Requests", disable=options.disable_tqdm)

        async def one(request: BenchRequest) -> RequestResult:
            async with semaphore:
                result = await send_request(client, target, request, headers)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for request, offset in zip(requests, offsets, strict=True):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        bar.close()
    return results, duration


def summarize(
    results: list[RequestResult], duration: float, slo_ms: dict[str, float] | None = None
) -> dict[str, Any]:
    """The run's figures, with vLLM's key names (latencies in ms, throughputs per second)."""
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    per_request = [
        {"ttft": r.ttft * 1000.0, "tpot": r.tpot * 1000.0, "e2el": r.latency * 1000.0} for r in ok
    ]
    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": _rate(len(ok), duration),
        "output_throughput": _rate(output_tokens, duration),
        "total_token_throughput": _rate(input_tokens + output_tokens, duration),
        "request_goodput": None,
    }
    if slo_ms:
        good = count_good(per_request, slo_ms)
        summary["request_goodput"] = _rate(good, duration)
        summary["num_good_requests"] = good
        summary["goodput_slo_ms"] = dict(slo_ms)
    samples = {
        "ttft": ms(r.ttft for r in ok),
        "tpot": ms(r.tpot for r in ok if r.output_tokens > 1),
        "itl": ms(gap for r in ok for gap in r.itl),
        "e2el": ms(r.latency for r in ok),
    }
    for name, values in samples.items():
        summary.update(LatencySummary.of(values).as_flat_dict(name))
    errors = [r.error for r in results if not r.success]
    summary["errors"] = sorted(set(errors))[:10]
    return summary


def _rate(count: int, duration: float) -> float:
    return count / duration if duration > 0 else 0.0


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("Successful requests", summary["completed"]),
        ("Failed requests", summary["failed"]),
        ("Benchmark duration (s)", summary["duration"]),
        ("Total input tokens", summary["total_input_tokens"]),
        ("Total generated tokens", summary["total_output_tokens"]),
        ("Request throughput (req/s)", summary["request_throughput"]),
    ]
    if summary["request_goodput"] is not None:
        rows.append(("Request goodput (req/s)", summary["request_goodput"]))
    rows += [
        ("Output token throughput (tok/s)", summary["output_throughput"]),
        ("Total token throughput (tok/s)", summary["total_token_throughput"]),
    ]
    titles = {
        "ttft": "Time to First Token",
        "tpot": "Time per Output Token (excl. 1st token)",
        "itl": "Inter-token Latency",
        "e2el": "End-to-end Latency",
    }
    for name, title in titles.items():
        rows.append((f"-- {title} --", ""))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            rows.append((f"{label} {name.upper()} (ms)", summary[f"{stat}_{name}_ms"]))
    return rows


def run(ns: argparse.Namespace) -> int:
    options = options_from_namespace(ns, ns.max_concurrency)
    requests = load_serve_dataset(ns, ns.num_prompts)
    target = resolve_target(ns, ns.base_url, ns.model, options)
    results, duration = asyncio.run(run_load(target, requests, options))
    summary = summarize(results, duration, options.slo_ms)
    print_table("Serving Benchmark Result", summary_rows(summary))
    for error in summary["errors"]:
        print(f"error: {error}")
    if ns.output_json:
        write_json(ns.output_json, serve_record(ns, target, options, summary, results))
    return 0 if summary["completed"] else 1


def serve_record(
    ns: argparse.Namespace,
    target: ApiTarget,
    options: LoadOptions,
    summary: dict[str, Any],
    results: list[RequestResult],
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_url": target.base_url,
        "endpoint": target.endpoint,
        "model_id": target.model,
        "dataset": ns.dataset,
        "num_prompts": len(results),
        "request_rate": "inf" if math.isinf(options.request_rate) else options.request_rate,
        "max_concurrency": options.max_concurrency,
        "ignore_eos": target.ignore_eos,
        "seed": options.seed,
        **summary,
    }
    if getattr(ns, "save_detailed", False):
        record["requests"] = [
            {
                "success": r.success,
                "error": r.error,
                "prompt_len": r.prompt_len,
                "output_tokens": r.output_tokens,
                "ttft_s": r.ttft,
                "tpot_s": r.tpot,
                "e2el_s": r.latency,
                "itl_s": r.itl,
            }
            for r in results
        ]
    return record
