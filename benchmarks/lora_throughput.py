#!/usr/bin/env python3
"""What serving LoRA adapters costs: offline throughput on a workload (default: the shared one)
with every request on the base model vs. the requests spread over 4 adapters (request i on
adapter i % 4, so every step mixes them), on one engine with --enable-lora, runs alternated,
medians; and the base model on an engine without --enable-lora (what enabling costs).

  .venv/bin/python benchmarks/lora_throughput.py --max-model-len 2048 \\
      --speculative-config none --no-enable-prefix-caching [--limit 100] [--repeats 3]

The adapters are made here with peft on the model (rank --rank, on q/k/v/o/gate/up/down, random
non-zero B). Prefix caching off: with it on, every run after the first finds its prompts cached.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing pagedllm

from benchmarks.workload_args import workload_parser  # noqa: E402
from pagedllm.entrypoints.bench.datasets import load_jsonl_dataset  # noqa: E402
from pagedllm.entrypoints.bench.offline import engine_prompt, exact_params  # noqa: E402
from pagedllm.entrypoints.engine_cli_args import engine_args_from_namespace  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_path: str, out_dir: str, count: int, rank: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    directory, filename = os.path.split(model_path)
    kwargs = {"gguf_file": filename} if filename.endswith(".gguf") else {}
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(
            directory if kwargs else model_path, dtype=torch.float32, **kwargs
        )
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.02)
        path = os.path.join(out_dir, f"adapter{i}")
        model.save_pretrained(path)
        paths.append(path)
    return paths


def timed(llm, prompts, params, loras) -> float:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    seconds = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / seconds


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    ns = parser.parse_args()
    from pagedllm import LLM, LoRARequest
    from pagedllm.model_executor.loader import resolve_model

    args = engine_args_from_namespace(ns)
    model_path = resolve_model(args.model).path
    requests = load_jsonl_dataset(ns.dataset)[: ns.limit]
    prompts = [engine_prompt(r) for r in requests]
    params = [exact_params(r.output_len) for r in requests]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model_path, tmp, ns.adapters, ns.rank)
        loras = [LoRARequest(f"adapter{i}", i + 1, p) for i, p in enumerate(paths)]
        fields = {k: v for k, v in vars(args).items()}
        plain = LLM(**{**fields, "enable_lora": False})
        runs: dict[str, list[float]] = {}
        runs["plain"] = [timed(plain, prompts, params, None) for _ in range(ns.repeats)]
        plain.shutdown()
        del plain
        llm = LLM(**{**fields, "enable_lora": True, "max_loras": ns.adapters,
                     "max_lora_rank": max(ns.rank, 16)})  # fmt: skip
        mixed = [loras[i % len(loras)] for i in range(len(prompts))]
        runs["base"], runs["mixed"] = [], []
        for _ in range(ns.repeats):
            runs["base"].append(timed(llm, prompts, params, None))
            runs["mixed"].append(timed(llm, prompts, params, mixed))
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    print(
        f"pagedllm {args.dtype} on the {llm.engine.runner.backend.name} backend, "
        f"{len(requests)} requests, {ns.adapters} adapters of rank {ns.rank}"
    )
    print(f"  engine without --enable-lora: {med['plain']:.1f} output tok/s {runs['plain']}")
    print(f"  --enable-lora, base model:    {med['base']:.1f} {runs['base']}")
    print(
        f"  --enable-lora, {ns.adapters} adapters mixed: {med['mixed']:.1f} {runs['mixed']} "
        f"({100 * (med['mixed'] / med['base'] - 1):+.1f}% vs the base model)"
    )


if __name__ == "__main__":
    main()
