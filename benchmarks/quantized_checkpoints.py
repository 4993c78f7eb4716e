"""Quantized SmolLM2 checkpoints against its dense weights: batch-1 decoding (512-token prompt,
128 new tokens, drafts off) and offline throughput of 64 requests (256 in, 128 out), each
engine in turn in one process, bf16 compute.

The AWQ / GPTQ / compressed-tensors checkpoints are made from the embedded model's weights by
tests/quantized_checkpoints.py (cached under --work); the GGUF rows are the file itself,
dequantized at load (the default) or kept in its Q4_1/Q8_0 blocks.

  .venv/bin/python benchmarks/quantized_checkpoints.py [--only awq_g64 dense] [--work DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.cpu_info import cpu_model  # noqa: E402
from pagedllm.model_executor.loader import ensure_default_model  # noqa: E402

FORMATS = {  # method, bits, group, symmetric, act order
    "awq_g64": ("awq", 4, 64, False, False),
    "gptq4_g64_act_order": ("gptq", 4, 64, False, True),
    "ct_int4_g32": ("compressed-tensors", 4, 32, True, False),
    "ct_int8_channel": ("compressed-tensors", 8, -1, True, False),
}
ENGINES = ["dense", "gguf_kept", *FORMATS]


def checkpoint(name: str, gguf: str, work: str) -> str:
    out = os.path.join(work, name)
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.quantized_checkpoints import write_quantized_checkpoint

    d, f = os.path.split(gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    write_quantized_checkpoint(model, out, *FORMATS[name])
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(out)
    return out


def measure(llm: LLM) -> dict[str, float]:
    import random

    rng = random.Random(0)
    vocab = 49000

    def run(prompts, n):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - t0

    long = [[rng.randrange(100, vocab) for _ in range(512)]]
    run(long, 8)  # warm-up
    one = min(run(long, 1) for _ in range(3))
    full = min(run(long, 128) for _ in range(3))
    batch = [[rng.randrange(100, vocab) for _ in range(256)] for _ in range(64)]
    run(batch[:8], 8)
    t = run(batch, 128)
    return {
        "b1_total_s": full,
        "b1_decode_ms": (full - one) / 127 * 1e3,
        "b64_tok_s": 64 * 128 / t,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=ENGINES, choices=ENGINES)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "pagedllm-quant-bench"))
    args = ap.parse_args()
    gguf = ensure_default_model()
    print(f"CPU: {cpu_model()}; bf16; drafts off")
    print(f"{'engine':22} {'1x(512+128) s':>14} {'decode ms/tok':>14} {'64x(256+128) tok/s':>20}")
    for name in args.only:
        kw: dict = {}
        model = gguf
        if name == "gguf_kept":
            kw["quantization"] = "gguf"
        elif name != "dense":
            model = checkpoint(name, gguf, args.work)
        llm = LLM(
            model,
            dtype="bfloat16",
            speculative_config=None,
            max_model_len=2048,
            kv_cache_memory=1 << 30,
            **kw,
        )
        r = measure(llm)
        print(
            f"{name:22} {r['b1_total_s']:14.3f} {r['b1_decode_ms']:14.2f} {r['b64_tok_s']:20.1f}",
            flush=True,
        )
        del llm
        gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
