"""``pagedllm bench``: the tools users compare engines with (named after ``vllm bench``).

- ``throughput``: offline, every request at once through ``LLM.generate``;
- ``latency``: one batch end to end, repeated;
- ``serve``: a streaming load client for any OpenAI-compatible server;
- ``sweep``: ``serve`` at a ladder of concurrencies, into a CSV and a plot.

A user mistake (bad flag value, malformed dataset line) prints ``error: ...`` and exits with 2,
without a traceback. Heavy imports (torch, matplotlib) wait until a tool needs them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from types import ModuleType


def _tools() -> dict[str, tuple[ModuleType, str]]:
    from pagedllm.entrypoints.bench import latency, serve, sweep, throughput

    return {
        "throughput": (throughput, "offline throughput of one LLM.generate call"),
        "latency": (latency, "end-to-end latency of one batch"),
        "serve": (serve, "load-test an OpenAI-compatible server"),
        "sweep": (sweep, "bench serve at several concurrencies -> CSV + PNG"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedllm bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="tool", required=True)
    for name, (module, help_text) in _tools().items():
        tool_parser = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_args(tool_parser)
        run: Callable[[argparse.Namespace], int] = module.run
        tool_parser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    # httpx logs every request at INFO: thousands of lines in a load test.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return ns.run(ns)
    except (ValueError, OSError) as exc:  # user mistakes: bad values, missing files
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
