#!/usr/bin/env python3
"""The naive Hugging Face baselines an engine must beat, on the same weights and workload.

Two ways of serving a workload with plain ``transformers``:

- ``sequential``: ``model.generate()`` one request at a time (batch size 1);
- ``static``: batches of ``--batch-size`` requests in workload order, left-padded, each batch
  running until its longest member is done (``max_new_tokens`` = the batch's largest
  ``output_len``); shorter requests keep generating tokens nobody asked for.

Like the engine benches, every request is greedy and never stops early (``min_new_tokens`` =
``max_new_tokens`` stands in for ignore_eos), and only each request's own ``output_len`` tokens
count as useful output. The weights are the engine's: the embedded SmolLM2 GGUF (dequantized by
transformers' own GGUF loader) by default, or any HF directory / .gguf file with ``--model``.

Sequential generation runs about 15 output tokens/s on 2 cores, so the whole peers' workload
(27,140 output tokens) would take half an hour: ``--limit N`` runs the first N requests, and the
subset is recorded in the results.

  .venv/bin/python benchmarks/hf_baselines.py --limit 20 --output-json hf.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing pagedllm

from pagedllm.entrypoints.bench.datasets import BenchRequest, load_jsonl_dataset  # noqa: E402
from pagedllm.entrypoints.bench.flops import request_flops  # noqa: E402
from pagedllm.entrypoints.bench.report import print_table, write_json  # noqa: E402
from pagedllm.model_executor.models.hf_config import arch_config_from_hf  # noqa: E402

DEFAULT_WORKLOAD = os.path.normpath(
    os.path.join(REPO_ROOT, "..", "shared", "peers", "workload.jsonl")
)
MODES = ("sequential", "static")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=None,
        help="HF directory or .gguf file (default: the embedded SmolLM2 GGUF)",
    )
    parser.add_argument(
        "--dataset",
        default=DEFAULT_WORKLOAD,
        help="JSONL workload (default: the peers' workload.jsonl)",
    )
    parser.add_argument("--limit", type=int, default=None, help="run only the first N requests")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both")
    parser.add_argument("--batch-size", type=int, default=16, help="static batch size")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )
    parser.add_argument(
        "--peak-gflops",
        type=float,
        default=None,
        help="GEMM rate from benchmarks/gemm_rate.py, to report the fraction",
    )
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--disable-tqdm", action="store_true")
    return parser.parse_args(argv)


def load_model(model: str | None, dtype: str) -> tuple[Any, Any, str]:
    """-> (model, tokenizer, where the weights came from)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        from pagedllm.model_executor.loader import ensure_default_model

        model = ensure_default_model()
    kwargs: dict[str, Any] = {}
    path = model
    if model.endswith(".gguf"):
        path, kwargs["gguf_file"] = os.path.split(os.path.abspath(model))
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right edge
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)
    return hf_model.eval(), tokenizer, model


def static_batches(requests: list[BenchRequest], batch_size: int) -> list[list[BenchRequest]]:
    """Workload order, no sorting by length: the naive way."""
    return [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]


def generate(model: Any, tokenizer: Any, prompts: list[str], num_tokens: int) -> tuple[int, int]:
    """Greedy ``num_tokens`` tokens for each prompt, never stopping early.
    -> (prompt tokens without padding, tokens generated per sequence)."""
    import torch

    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=num_tokens,
            min_new_tokens=num_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return int(enc["attention_mask"].sum()), out.shape[1] - enc["input_ids"].shape[1]


def run_mode(
    mode: str, model: Any, tokenizer: Any, requests: list[BenchRequest], ns: argparse.Namespace
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    batch_size = 1 if mode == "sequential" else ns.batch_size
    batches = static_batches(requests, batch_size)
    generate(model, tokenizer, [requests[0].prompt], 4)  # warm-up, untimed
    prompt_tokens = useful = generated = 0
    flops = 0.0
    shape = arch_config_from_hf(model.config)
    start = time.perf_counter()
    for batch in tqdm(batches, desc=mode, disable=ns.disable_tqdm):
        longest = max(r.output_len for r in batch)
        num_prompt, num_new = generate(model, tokenizer, [str(r.prompt) for r in batch], longest)
        if num_new != longest:
            raise RuntimeError(f"generate() stopped after {num_new} of {longest} tokens")
        prompt_tokens += num_prompt
        useful += sum(r.output_len for r in batch)
        generated += num_new * len(batch)
    elapsed = time.perf_counter() - start
    for r in requests:  # useful work only, as for the engines
        flops += request_flops(shape, len(tokenizer(str(r.prompt)).input_ids), r.output_len)
    result = {
        "mode": mode,
        "batch_size": batch_size,
        "num_requests": len(requests),
        "prompt_tokens": prompt_tokens,
        "useful_output_tokens": useful,
        "generated_tokens": generated,  # including the static batches' waste
        "elapsed_s": elapsed,
        "requests_per_s": len(requests) / elapsed,
        "output_tokens_per_s": useful / elapsed,
        "total_tokens_per_s": (prompt_tokens + useful) / elapsed,
        "achieved_gflops": flops / elapsed / 1e9,
    }
    if ns.peak_gflops:
        result["fraction_of_peak"] = result["achieved_gflops"] / ns.peak_gflops
    return result


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        if ns.batch_size < 1 or (ns.limit is not None and ns.limit < 1) or ns.threads < 1:
            raise ValueError("--batch-size, --limit and --threads must be positive")
        requests = load_jsonl_dataset(ns.dataset, ns.limit)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch
    import transformers

    torch.set_num_threads(ns.threads)
    start = time.perf_counter()
    model, tokenizer, source = load_model(ns.model, ns.dtype)
    load_s = time.perf_counter() - start
    subset = f"first {len(requests)} requests of {ns.dataset}"
    print(f"HF baselines on {subset} ({source}, {ns.dtype}, {ns.threads} threads)", flush=True)
    modes = MODES if ns.mode == "both" else (ns.mode,)
    results = {mode: run_mode(mode, model, tokenizer, requests, ns) for mode in modes}
    for mode, r in results.items():
        print_table(
            f"HF {mode} (batch {r['batch_size']})",
            [
                ("Requests", r["num_requests"]),
                ("Prompt tokens", r["prompt_tokens"]),
                ("Useful output tokens", r["useful_output_tokens"]),
                ("Generated tokens (incl. waste)", r["generated_tokens"]),
                ("Wall time (s)", r["elapsed_s"]),
                ("Output token throughput (tok/s)", r["output_tokens_per_s"]),
                ("Total token throughput (tok/s)", r["total_tokens_per_s"]),
                ("Useful GFLOP/s", r["achieved_gflops"]),
            ],
        )
    if ns.output_json:
        write_json(
            ns.output_json,
            {
                "engine": f"transformers {transformers.__version__}",
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "model": source,
                "dtype": ns.dtype,
                "threads": ns.threads,
                "dataset": ns.dataset,
                "subset": {"first_n": len(requests), "limit": ns.limit},
                "load_s": load_s,
                "modes": results,
            },
        )
    return 0


if __name__ == "__main__":
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()  # generation-flag chatter on every call
    sys.exit(main())
