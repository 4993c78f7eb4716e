"""Command-line flags generated from EngineArgs' fields, so the CLI and the Python API never
drift apart (vLLM's spelling: --max-model-len, --max-num-seqs, ...)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from pagedllm.config import SUPPORTED_DTYPES, EngineArgs

HELP = {
    "model": "Hugging Face directory, .gguf file or hub repo id "
    "(default: embedded SmolLM2-135M-Instruct)",
    "tokenizer": "tokenizer directory or repo id "
    "(default: the model's own, or the GGUF's metadata)",
    "revision": "hub revision (branch, tag or commit) when --model is a repo id",
    "dtype": f"weight and activation dtype: auto, {', '.join(SUPPORTED_DTYPES)} "
    "(auto = bfloat16 on CPUs with AVX512-BF16/AMX and bf16 GPUs, else float32)",
    "max_model_len": "longest sequence (prompt + output) in tokens (default: the model's limit)",
    "max_num_seqs": "most sequences decoded together in one step",
    "max_num_batched_tokens": "most tokens (prefill + decode) in one step "
    "(default 2048; `pagedllm serve`: 512, for a shorter time to first token)",
    "block_size": "tokens per KV-cache block",
    "kv_cache_memory": "KV-cache budget in bytes on CPU "
    "(default 4 GiB, or env PAGEDLLM_KV_CACHE_MEMORY)",
    "kv_cache_dtype": "KV-cache storage: auto (the model dtype), bfloat16 (under an fp32 model: "
    "half the bytes, the rest of the model stays fp32) or int8 (symmetric, one fp32 "
    "scale per token and head: half the bytes of bf16, so faster decoding of long contexts "
    "and ~1.9x the tokens per GiB, at a small accuracy cost; see docs/benchmarks.md)",
    "quantization": "int8: also keep per-output-channel int8 copies of the matmul weights and "
    "use them in steps of at most 4 tokens (batch-1 style decoding, bound by reading the "
    "weights); larger steps keep the full-precision ones. gguf: keep a GGUF file's quantized "
    "weights (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K) in their blocks, as llama.cpp does: ~4x "
    "fewer bytes than bf16 for 4-bit files, decoded on the fly (default: none: GGUF weights "
    "are dequantized to --dtype at load). awq, gptq, compressed-tensors: a quantized "
    "checkpoint's method, which is read from its config.json whether or not this names it "
    "(4/8-bit weights kept packed, decoded on the fly)",
    "gpu_memory_utilization": "fraction of GPU memory for weights + KV cache (CUDA only)",
    "num_kv_blocks": "exact number of KV blocks (overrides the memory budget; for tests)",
    "enable_prefix_caching": "reuse KV blocks of shared prompt prefixes across requests",
    "enable_chunked_prefill": "split long prompts across steps under the token budget",
    "seed": "global random seed (per-request seeds come with each request)",
    "device": "cpu or cuda (default: cuda when available)",
    "speculative_config": "speculative decoding, as JSON like vLLM's "
    '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, '
    '"prompt_lookup_max": 3}\', or auto (those values) or none: draft tokens found by n-gram '
    "lookup in the request's own tokens, checked in one forward pass; greedy requests only, "
    "where the output stays exact (see docs/architecture.md)",
    "tensor_parallel_size": "split the model's heads, MLP and vocabulary across this many "
    "ranks (worker processes or Ray actors), one all-reduce after attention and one after "
    "the MLP; on CPU each rank takes its share of the cores (PAGEDLLM_CPU_THREADS_BIND) "
    "(see docs/distributed.md)",
    "distributed_executor_backend": "how the tensor-parallel ranks run: mp (worker processes "
    "on this machine; the default for --tensor-parallel-size > 1), ray (Ray actors on the "
    "nodes of a Ray cluster) or uni (one rank, in-process; the default otherwise)",
    "runner": "what the model serves: generate (completions, chat), pooling (/v1/embeddings, "
    "/pooling, /score) or auto (pooling for an encoder such as BertModel or with --convert "
    "embed, else generate)",
    "convert": "embed: serve a decoder (Llama, Qwen2, ...) as an embedding model, its last "
    "token's final hidden state normalized (vLLM's --convert embed); auto: as the runner needs",
    "pooler_config": 'pooling model: JSON like vLLM\'s \'{"pooling_type": "MEAN", '
    "\"normalize\": true}' (MEAN, CLS or LAST) over the model's sentence-transformers "
    "files (modules.json, 1_Pooling/config.json)",
    "deterministic": "batch-invariant kernels: a request's greedy output is the same whatever "
    "else is in the batch, its place in it, prefix-cache hits and chunking, in bf16 as in "
    "fp32 (every matmul sums in one fixed order, every query row attends on the decode "
    "kernel; costs throughput, see docs/benchmarks.md); native CPU backends only",
    "ray_address": "the Ray cluster to join with --distributed-executor-backend ray "
    "(host:6379 as `ray start --head` prints it; default: env RAY_ADDRESS, else a new local "
    "cluster)",
}


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    for f in dataclasses.fields(EngineArgs):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = HELP.get(f.name, "")
        if f.type in ("bool", bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
            continue
        kind: Any = str
        if "int" in str(f.type):
            kind = int
        elif "float" in str(f.type):
            kind = float
        parser.add_argument(flag, type=kind, default=f.default, help=help_text + _default(f))


def engine_args_from_namespace(ns: argparse.Namespace) -> EngineArgs:
    names = EngineArgs.field_names()
    return EngineArgs(**{k: v for k, v in vars(ns).items() if k in names})


def _default(f: dataclasses.Field) -> str:
    return "" if f.default is None else f" (default: {f.default})"
