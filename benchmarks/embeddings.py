#!/usr/bin/env python3
"""Embeddings per second: pagedllm's LLM.embed against sentence-transformers' encode on the
same model files and CPU, at batch 1 (one sentence per call) and batch 64 (sentence-
transformers' batch_size=64; pagedllm --max-num-seqs 64, its scheduler batching the prompts).
Rounds alternate between the two; medians reported. Also checks the embeddings agree.

  .venv/bin/python benchmarks/embeddings.py [--dtype float32] [--sentences 512] [--rounds 5]

The model: all-MiniLM-L6-v2 from its PyPI wheel (or --model DIR, a sentence-transformers dir).
sentence-transformers runs fp32 (its default); pagedllm runs --dtype (auto: bf16 where the CPU
multiplies bf16 natively).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing pagedllm

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pagedllm.cpu_info import cpu_model  # noqa: E402

WORDS = (
    "the a cat dog market paged attention cache block token model sentence embedding vector "
    "search retrieval query document rain sun moon river city engine server request batch"
).split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """Short and long sentences (4 to 60 words), as a retrieval corpus mixes them."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60))).capitalize() + "."
        for _ in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--batch1-sentences", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    from pagedllm import LLM
    from pagedllm.model_executor.loader import resolve_model

    model_dir = resolve_model(args.model).path
    llm = LLM(model_dir, dtype=args.dtype, max_num_seqs=64)
    st = SentenceTransformer(model_dir, device="cpu")
    corpus = sentences(args.sentences)
    singles = corpus[: args.batch1_sentences]
    num_tokens = sum(len(t) for t in st.tokenizer(corpus)["input_ids"])
    print(
        f"model {args.model}; pagedllm {llm.engine.model_config.dtype} on the "
        f"{llm.engine.runner.backend.name} backend, sentence-transformers fp32; torch threads "
        f"{torch.get_num_threads()}; CPU: {cpu_model()}"
    )
    print(f"{len(corpus)} sentences, {num_tokens} tokens (mean {num_tokens / len(corpus):.1f})")

    def ours_batched():
        return np.array([o.outputs.embedding for o in llm.embed(corpus, use_tqdm=False)])

    def st_batched():
        return st.encode(corpus, batch_size=64, convert_to_numpy=True)

    def ours_single():
        for s in singles:
            llm.embed(s, use_tqdm=False)

    def st_single():
        for s in singles:
            st.encode([s], batch_size=1, convert_to_numpy=True)

    a, b = ours_batched(), st_batched()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(f"agreement: min cosine {cos.min():.6f} over {len(corpus)} sentences")
    ours_single(), st_single()  # warm-up

    rates: dict[str, list[float]] = {k: [] for k in ("ours64", "st64", "ours1", "st1")}
    for _ in range(args.rounds):
        for key, fn, n in (
            ("ours64", ours_batched, len(corpus)),
            ("st64", st_batched, len(corpus)),
            ("ours1", ours_single, len(singles)),
            ("st1", st_single, len(singles)),
        ):
            t0 = time.perf_counter()
            fn()
            rates[key].append(n / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{'':24}{'pagedllm':>12}{'sent-transf':>14}{'ratio':>8}   (embeddings/s, median)")
    for label, ours, theirs in (("batch 64", "ours64", "st64"), ("batch 1", "ours1", "st1")):
        print(
            f"{label:24}{med[ours]:12.1f}{med[theirs]:14.1f}{med[ours] / med[theirs]:8.2f}"
            f"   min/max pagedllm {min(rates[ours]):.1f}/{max(rates[ours]):.1f}, "
            f"s-t {min(rates[theirs]):.1f}/{max(rates[theirs]):.1f}"
        )


if __name__ == "__main__":
    main()
