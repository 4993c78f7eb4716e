"""``pagedllm bench sweep``: ``bench serve`` at a ladder of concurrencies, into a CSV and a plot.

Against ``--base-url`` if given; otherwise it starts the server itself (``pagedllm serve`` with
``--model``/``--server-args``, or any ``--server-cmd``), waits for /health, runs every
concurrency against the same warm server, and stops it with SIGTERM. Each level sends
``max(--num-prompts, --prompts-per-concurrency x concurrency)`` requests, so high levels are
measured in steady state rather than in their ramp-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import sys
from typing import Any

from pagedllm.entrypoints.bench.datasets import RANDOM_DATASET, BenchRequest, load_jsonl_dataset
from pagedllm.entrypoints.bench.openai_client import ApiTarget
from pagedllm.entrypoints.bench.report import print_table, write_json
from pagedllm.entrypoints.bench.serve import (
    add_client_args,
    load_serve_dataset,
    options_from_namespace,
    resolve_target,
    run_load,
    serve_record,
    summarize,
)
from pagedllm.entrypoints.bench.server_process import ServerProcess, free_port
from pagedllm.entrypoints.bench.sweep_report import write_csv, write_plot


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--concurrencies", default="1,2,4,8,16,32,64", help="comma-separated max-concurrency levels"
    )
    parser.add_argument(
        "--base-url", default=None, help="benchmark this running server instead of starting one"
    )
    parser.add_argument(
        "--server-cmd",
        default=None,
        help="command starting the server, with {host}, {port} and {python} "
        "placeholders (default: pagedllm serve)",
    )
    parser.add_argument(
        "--server-args",
        default="",
        help="extra flags for the default pagedllm serve command, one string",
    )
    parser.add_argument("--host", default="127.0.0.1", help="where the started server listens")
    parser.add_argument("--port", type=int, default=None, help="its port (default: a free one)")
    parser.add_argument("--server-startup-timeout", type=float, default=600.0)
    add_client_args(
        parser,
        model_help="with --base-url: the model name to send; otherwise "
        "the model the started pagedllm server loads",
    )
    parser.add_argument(
        "--num-prompts", type=int, default=16, help="fewest requests per concurrency level"
    )
    parser.add_argument("--prompts-per-concurrency", type=int, default=4)
    parser.add_argument(
        "--output-dir",
        default="bench-sweep",
        help="where sweep.csv, sweep.png, per-level JSON and server.log go",
    )


def parse_concurrencies(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"--concurrencies must be comma-separated integers, got {text!r}"
        ) from None
    if not levels or any(c < 1 for c in levels):
        raise ValueError(f"--concurrencies must list positive integers, got {text!r}")
    return sorted(set(levels))


def server_argv(ns: argparse.Namespace, host: str, port: int) -> list[str]:
    if ns.server_cmd:
        return shlex.split(ns.server_cmd.format(host=host, port=port, python=sys.executable))
    argv = [
        sys.executable,
        "-m",
        "pagedllm.entrypoints.cli",
        "serve",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if ns.model:
        argv += ["--model", ns.model]
    return argv + shlex.split(ns.server_args)


def run(ns: argparse.Namespace) -> int:
    levels = parse_concurrencies(ns.concurrencies)
    options = options_from_namespace(ns, None)  # validates the shared flags up front
    if ns.num_prompts < 1 or ns.prompts_per_concurrency < 0:
        raise ValueError("--num-prompts must be positive, --prompts-per-concurrency non-negative")
    most = max(ns.num_prompts, ns.prompts_per_concurrency * levels[-1])
    pool = _request_pool(ns, most)
    os.makedirs(ns.output_dir, exist_ok=True)

    server: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    base_url, request_model = ns.base_url, ns.model
    if base_url is None:
        port = ns.port or free_port(ns.host)
        base_url = f"http://{ns.host}:{port}"
        log_path = os.path.join(ns.output_dir, "server.log")
        print(f"starting the server (log: {log_path})", flush=True)
        server = ServerProcess(
            server_argv(ns, ns.host, port),
            base_url,
            log_path,
            startup_timeout_s=ns.server_startup_timeout,
        )
        request_model = None  # --model was the server's; ask it what name it serves
    try:
        with server:
            target = resolve_target(ns, base_url, request_model, options)
            rows = _run_levels(ns, levels, pool, target)
    except RuntimeError as exc:  # the server would not start
        print(f"error: {exc}", file=sys.stderr)
        return 1

    csv_path = os.path.join(ns.output_dir, "sweep.csv")
    png_path = os.path.join(ns.output_dir, "sweep.png")
    write_csv(csv_path, rows)
    slo = options.slo_ms.get("ttft")
    write_plot(png_path, rows, title=f"{target.model} via {target.endpoint}", ttft_slo_ms=slo)
    print_table(
        "Sweep",
        [
            (
                f"c={r['max_concurrency']} tok/s | TTFT p95 ms",
                f"{r['output_throughput']:.1f} | {r['p95_ttft_ms']:.0f}",
            )
            for r in rows
        ],
    )
    print(f"wrote {csv_path} and {png_path}")
    return 0 if all(r["completed"] for r in rows) else 1


def _request_pool(ns: argparse.Namespace, most: int) -> list[BenchRequest]:
    """The requests every level draws its first N from (a file may hold fewer than ``most``)."""
    if ns.dataset == RANDOM_DATASET:
        return load_serve_dataset(ns, most)
    return load_jsonl_dataset(ns.dataset)[:most]


def _run_levels(
    ns: argparse.Namespace, levels: list[int], pool: list[BenchRequest], target: ApiTarget
) -> list[dict[str, Any]]:
    rows = []
    for level in levels:
        num = min(len(pool), max(ns.num_prompts, ns.prompts_per_concurrency * level))
        requests = pool[:num]
        options = options_from_namespace(ns, level)
        print(f"concurrency {level}: {num} requests", flush=True)
        results, duration = asyncio.run(run_load(target, requests, options))
        summary = summarize(results, duration, options.slo_ms)
        record = serve_record(ns, target, options, summary, results)
        write_json(os.path.join(ns.output_dir, f"serve_c{level}.json"), record)
        rows.append({"max_concurrency": level, **record, "num_prompts": num})
        print(
            f"concurrency {level}: {summary['output_throughput']:.1f} output tok/s, "
            f"TTFT p95 {summary['p95_ttft_ms']:.0f} ms, {summary['failed']} failed",
            flush=True,
        )
        for error in summary["errors"][:3]:
            print(f"  error: {error}", flush=True)
        # Written after every level, so a sweep cut short keeps what it measured.
        write_csv(os.path.join(ns.output_dir, "sweep.csv"), rows)
    return rows
