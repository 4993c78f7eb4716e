#!/usr/bin/env python3
"""Does speculative decoding ever lower throughput? Offline output tok/s of one workload with

    off        --speculative-config none
    adaptive   the default n-gram drafts, gated by the draft policy (engine/draft_policy.py)
    fixed      n-gram drafts wherever they match ({"adaptive": false})
    wrong      the policy over a proposer whose drafts never match (random tokens)

each mode run --repeats times, interleaved (off, adaptive, ... then again), each run in a
fresh process (engines built one after another in one process ran later ones up to 10% slower),
medians reported with each mode's ratio to ``off``, the drafts proposed and accepted, and the
policy's measured relative cost of a draft row.

  .venv/bin/python benchmarks/spec_decode_adaptive.py --dataset ../shared/peers/workload.jsonl \\
      --max-model-len 2048 [--dtype float32] [--modes off,adaptive,wrong] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing pagedllm

from pagedllm.entrypoints.bench.datasets import load_jsonl_dataset  # noqa: E402
from pagedllm.entrypoints.bench.offline import engine_prompt, exact_params, load_llm  # noqa: E402
from pagedllm.entrypoints.engine_cli_args import (  # noqa: E402
    add_engine_args,
    engine_args_from_namespace,
)

SPEC = {
    "off": "none",
    "adaptive": '{"method": "ngram"}',
    "fixed": '{"method": "ngram", "adaptive": false}',
    "wrong": '{"method": "ngram"}',
}


class WrongProposer:
    """k random tokens whenever asked: drafts that (almost) never match."""

    def __init__(self, k: int, vocab: int) -> None:
        self.k, self.vocab, self.rng = k, vocab, random.Random(0)

    def propose(self, request, max_tokens: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(min(self.k, max_tokens))]

    def observe(self, req_id: str, num_drafts: int, num_accepted: int) -> None:
        pass

    def drop(self, req_id: str) -> None:
        pass


def run(mode: str, engine_args, requests) -> dict:
    llm, _ = load_llm(dataclasses.replace(engine_args, speculative_config=SPEC[mode]))
    scheduler = llm.engine.scheduler
    if mode == "wrong":
        scheduler.proposer = WrongProposer(4, llm.engine.model_config.vocab_size)
    llm.generate([engine_prompt(r) for r in requests[:2]], exact_params(8), use_tqdm=False)
    before = llm.engine.get_stats()
    start = time.perf_counter()
    outs = llm.generate(
        [engine_prompt(r) for r in requests],
        [exact_params(r.output_len) for r in requests],
        use_tqdm=False,
    )
    wall = time.perf_counter() - start
    stats = llm.engine.get_stats()
    policy = scheduler.draft_policy
    return {
        "tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / wall,
        "drafts": stats.spec_num_draft_tokens - before.spec_num_draft_tokens,
        "accepted": stats.spec_num_accepted_tokens - before.spec_num_accepted_tokens,
        "relative_cost": policy.relative_cost if policy is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--modes", default="off,adaptive,fixed,wrong")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--one-mode", default=None, help=argparse.SUPPRESS)  # a child run
    add_engine_args(parser)
    args = parser.parse_args(argv)
    if args.one_mode:
        requests = load_jsonl_dataset(args.dataset, args.num_prompts)
        print(json.dumps(run(args.one_mode, engine_args_from_namespace(args), requests)))
        return 0
    argv = sys.argv[1:] if argv is None else argv
    modes = args.modes.split(",")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            child = [sys.executable, os.path.abspath(__file__), *argv, "--one-mode", mode]
            done = subprocess.run(child, capture_output=True, text=True, check=True)
            res = json.loads(done.stdout.strip().splitlines()[-1])
            results[mode].append(res)
            print(mode, {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})
    base = statistics.median(r["tok_s"] for r in results.get("off", [])) if "off" in modes else 0
    print(f"\n{'mode':<10} {'tok/s (median)':>15} {'vs off':>8} {'drafts':>8} {'accepted':>9}")
    for mode in modes:
        tps = statistics.median(r["tok_s"] for r in results[mode])
        last = results[mode][-1]
        ratio = f"{tps / base:.3f}" if base else "-"
        print(f"{mode:<10} {tps:>15.1f} {ratio:>8} {last['drafts']:>8} {last['accepted']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
