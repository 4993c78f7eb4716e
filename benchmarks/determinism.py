#!/usr/bin/env python3
"""What --deterministic buys and costs, on the embedded SmolLM2 model.

Buys: of the ten greedy requests of tests/entrypoints/test_deterministic.py, how many give
other tokens inside a busy random batch than run alone, without and with the mode (two
busy batches, bf16 by default).
Costs: output tokens/s of those busy batches, and (with --workload) of the shared workload
(../shared/peers/workload.jsonl through `pagedllm bench throughput`), without and with.

  .venv/bin/python benchmarks/determinism.py [--dtype bfloat16] [--workload]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing pagedllm

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.cpu_info import cpu_model  # noqa: E402
from pagedllm.model_executor.loader import ensure_default_model  # noqa: E402
from tests.entrypoints.test_deterministic import MAX_TOKENS, TARGETS, busy_batch  # noqa: E402

WORKLOAD = os.path.join(REPO_ROOT, "..", "shared", "peers", "workload.jsonl")


def agreement(deterministic: bool, dtype: str) -> tuple[list[int], float]:
    llm = LLM(
        ensure_default_model(),
        dtype=dtype,
        deterministic=deterministic,
        max_num_batched_tokens=160,
        max_num_seqs=24,
        kv_cache_memory=192 * 2**20,
        max_model_len=1024,
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    alone = [llm.generate(p, greedy, use_tqdm=False)[0].outputs[0].token_ids for p in TARGETS]
    differing, tokens, seconds = [], 0, 0.0
    for seed in (1, 2):
        prompts, params = busy_batch(seed, llm.engine.model_config.vocab_size)
        rng = random.Random(seed)
        places = sorted(rng.sample(range(len(prompts) + len(TARGETS)), len(TARGETS)))
        for place, target in zip(places, TARGETS):
            prompts.insert(place, target)
            params.insert(place, greedy)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds += time.perf_counter() - t0
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        got = [outs[p].outputs[0].token_ids for p in places]
        differing.append(sum(g != a for g, a in zip(got, alone)))
    return differing, tokens / seconds


def workload_rate(deterministic: bool, dtype: str) -> str:
    cmd = [
        sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", "throughput",
        "--dataset", WORKLOAD, "--max-model-len", "2048", "--dtype", dtype,
    ]  # fmt: skip
    if deterministic:
        cmd.append("--deterministic")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO_ROOT).stdout
    return next(line for line in out.splitlines() if line.startswith("Output token throughput"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workload", action="store_true", help="also the shared workload")
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}, dtype {args.dtype}")
    for det in (False, True):
        differing, rate = agreement(det, args.dtype)
        print(
            f"deterministic={det}: of {len(TARGETS)} greedy requests, {differing} differ inside "
            f"the two busy batches from alone; busy batches {rate:.1f} output tok/s"
        )
    if args.workload:
        for det in (False, True):
            print(f"shared workload, deterministic={det}: {workload_rate(det, args.dtype)}")


if __name__ == "__main__":
    main()
