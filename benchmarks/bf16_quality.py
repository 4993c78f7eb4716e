"""How much does bf16 change the answers? Mean KL(fp32 || bf16) of next-token distributions
over workload prompts, and greedy agreement with the fp32 reference on chat prompts.

    .venv/bin/python benchmarks/bf16_quality.py [--num-prompts 40] [--max-tokens 64]
        [--kv-cache-dtype int8]   # bf16 with an int8 KV cache against the same fp32 reference
        [--dtype float32 --kv-cache-dtype bfloat16]   # fp32 with a bf16 KV cache
        [--quantization int8]     # bf16 with int8 weights (forced for every step size here,
                                  # prompt positions included; the engine uses them only in
                                  # steps of <= INT8_MAX_ROWS tokens)

Each prompt runs as two steps (its first token, then the rest) so that every later position
attends to keys and values read back from the KV cache, as decoding does: with an int8 cache
they are the quantized ones.
"""

from __future__ import annotations

import argparse
import json

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.model_executor.backends import linear
from pagedllm.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain in two sentences what a CPU cache is.",
    "List three fruits that are red.",
    "What is 12 plus 7? Answer briefly.",
    "Who wrote Romeo and Juliet?",
    "Give me a short tip for learning a new language.",
    "What is the boiling point of water in Celsius?",
]


def prompt_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Log-probs at every prompt position, in one prefill (no sampling, no state kept)."""
    engine = llm.engine
    bs = engine.args.block_size
    blocks = list(range(-(-len(ids) // bs)))
    new = NewRequestData("q", ids, [], SamplingParams(), blocks, 0)
    steps = [  # the first token, then the rest: both the one-row and the many-row paths
        SchedulerOutput(new_requests=[new], num_scheduled_tokens={"q": 1}),
        SchedulerOutput(
            cached_requests=[CachedRequestData("q", [], [], 1)],
            num_scheduled_tokens={"q": len(ids) - 1},
        ),
    ]
    logits = [engine.runner.forward_logits(step, all_positions=True)[1] for step in steps]
    engine.runner.requests.update(SchedulerOutput(finished_req_ids={"q"}))
    return torch.log_softmax(torch.cat(logits).float(), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", default="../shared/peers/workload.jsonl")
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "int8"])
    parser.add_argument("--quantization", default=None, choices=[None, "int8"])
    parser.add_argument("--output-json")
    args = parser.parse_args()
    rows = [json.loads(line) for line in open(args.workload)][: args.num_prompts]
    kw = dict(max_model_len=2048, kv_cache_memory=512 * 2**20)
    ref = LLM(dtype="float32", **kw)
    bf = LLM(
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
        **kw,
    )
    if args.quantization:
        linear.TorchLinearBackend.int8_max_rows = 1 << 30  # every step on the int8 weights
    tok = ref.get_tokenizer()

    kls, top1 = [], []
    for row in rows:
        ids = tok.encode(row["prompt"])
        p, q = prompt_logprobs(ref, ids), prompt_logprobs(bf, ids)
        kls.append((p.exp() * (p - q)).sum(-1))
        top1.append((p.argmax(-1) == q.argmax(-1)).float())
    kl = torch.cat(kls)
    agree = torch.cat(top1).mean().item()

    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    convs = [[{"role": "user", "content": c}] for c in CHAT_PROMPTS]
    a = ref.chat(convs, greedy, use_tqdm=False)
    b = bf.chat(convs, greedy, use_tqdm=False)
    same_tokens, total, identical = 0, 0, 0
    for x, y in zip(a, b, strict=False):
        tx, ty = x.outputs[0].token_ids, y.outputs[0].token_ids
        n = next(
            (i for i, (u, v) in enumerate(zip(tx, ty, strict=False)) if u != v),
            min(len(tx), len(ty)),
        )
        same_tokens += n
        total += len(tx)
        identical += tx == ty
    result = {
        "candidate": f"{args.dtype}, kv_cache_dtype={args.kv_cache_dtype}, "
        f"quantization={args.quantization}",
        "num_positions": kl.numel(),
        "mean_kl": kl.mean().item(),
        "p99_kl": kl.quantile(0.99).item(),
        "top1_agreement": agree,
        "greedy_identical_answers": f"{identical}/{len(convs)}",
        "greedy_common_prefix_fraction": same_tokens / max(total, 1),
        "answers": [
            {"prompt": c, "fp32": x.outputs[0].text, "bf16": y.outputs[0].text}
            for c, x, y in zip(CHAT_PROMPTS, a, b, strict=False)
        ],
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
