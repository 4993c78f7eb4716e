#!/usr/bin/env python3
"""What structured outputs cost: the same requests with and without a grammar, alternated on
one engine, medians reported.

1. Decode steps at batch 1 and 64: B sampled requests (seeded, ignore_eos, N new tokens),
   plain vs. every request under a JSON-schema grammar that never completes (an unbounded
   array of strings), so every token of every row is constrained: ms per step and the
   overhead (the masks are filled in the engine process and applied to those rows only).
2. Offline throughput on a workload (default: the shared one) with none vs. half of the
   requests constrained (the same grammar, greedy, exact lengths as `bench throughput`).

  .venv/bin/python benchmarks/structured_output_overhead.py --max-model-len 2048 \\
      --speculative-config none --no-enable-prefix-caching [--repeats 3] [--dtype float32]

Without --no-enable-prefix-caching every run after the first finds the workload's prompts in
the prefix cache; with drafts on, constrained outputs draft differently from plain ones.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing pagedllm

from benchmarks.workload_args import workload_parser  # noqa: E402
from pagedllm.entrypoints.bench.datasets import load_jsonl_dataset  # noqa: E402
from pagedllm.entrypoints.bench.offline import engine_prompt, exact_params  # noqa: E402
from pagedllm.entrypoints.engine_cli_args import engine_args_from_namespace  # noqa: E402
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402

GRAMMAR = StructuredOutputsParams(json={"type": "array", "items": {"type": "string"}})
PROMPT = [{"role": "user", "content": "List some fruits as a JSON array of strings."}]


def timed(llm, prompts, params) -> tuple[float, int]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(o.outputs[0].token_ids) for o in outs)


def decode_overhead(llm, batch: int, new_tokens: int, repeats: int) -> None:
    prompt = llm.apply_chat_template(PROMPT)[1]
    prompts = [{"prompt_token_ids": prompt}] * batch

    def params(grammar):
        return [
            SamplingParams(
                temperature=1.0,
                seed=i,
                max_tokens=new_tokens,
                ignore_eos=True,
                structured_outputs=grammar,
            )
            for i in range(batch)
        ]

    llm.generate(prompts[:1], params(GRAMMAR)[:1], use_tqdm=False)  # compile once, warm up
    runs: dict[str, list[float]] = {"plain": [], "grammar": []}
    for _ in range(repeats):
        for mode, grammar in (("plain", None), ("grammar", GRAMMAR)):
            seconds, _ = timed(llm, prompts, params(grammar))
            runs[mode].append(seconds * 1000 / new_tokens)  # ms per decode step (+ prefill)
    plain, grammar = statistics.median(runs["plain"]), statistics.median(runs["grammar"])
    print(
        f"batch {batch:3d}: {plain:7.2f} ms/step plain, {grammar:7.2f} ms/step with grammars "
        f"(+{grammar - plain:.2f} ms, {100 * (grammar / plain - 1):+.1f}%)  "
        f"runs {[round(x, 2) for x in runs['plain']]} vs {[round(x, 2) for x in runs['grammar']]}"
    )


def workload(llm, dataset: str, limit: int | None, repeats: int) -> None:
    requests = load_jsonl_dataset(dataset)[:limit]
    prompts = [engine_prompt(r) for r in requests]
    plain = [exact_params(r.output_len) for r in requests]
    half = []
    for i, p in enumerate(plain):
        p = p.clone()
        if i % 2 == 0:
            p.structured_outputs = GRAMMAR
        half.append(p)
    runs: dict[str, list[float]] = {"none": [], "half": []}
    for _ in range(repeats):
        for mode, params in (("none", plain), ("half", half)):
            seconds, tokens = timed(llm, prompts, params)
            runs[mode].append(tokens / seconds)
    none, half_rate = statistics.median(runs["none"]), statistics.median(runs["half"])
    print(
        f"workload ({len(requests)} requests): {none:.1f} output tok/s none constrained, "
        f"{half_rate:.1f} with half constrained ({100 * (half_rate / none - 1):+.1f}%)  "
        f"runs {[round(x, 1) for x in runs['none']]} vs {[round(x, 1) for x in runs['half']]}"
    )


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-workload", action="store_true")
    ns = parser.parse_args()
    from pagedllm.entrypoints.llm import LLM

    args = engine_args_from_namespace(ns)
    llm = LLM(**{k: v for k, v in vars(args).items()})
    print(f"pagedllm {args.dtype}, speculative_config {args.speculative_config}")
    for batch in (1, 64):
        decode_overhead(llm, batch, ns.new_tokens, ns.repeats)
    if not ns.skip_workload:
        workload(llm, ns.dataset, ns.limit, ns.repeats)


if __name__ == "__main__":
    main()
