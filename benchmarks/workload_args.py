"""The flags the offline workload benchmarks share: every engine flag, the workload file (the
shared one by default), how many of its requests, how many alternated repeats."""

from __future__ import annotations

import argparse
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_WORKLOAD = os.path.join(REPO_ROOT, "..", "shared", "peers", "workload.jsonl")


def workload_parser(doc: str) -> argparse.ArgumentParser:
    from pagedllm.entrypoints.engine_cli_args import add_engine_args

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_engine_args(parser)
    parser.add_argument("--dataset", default=SHARED_WORKLOAD)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    return parser
