"""Row padding of a step's batch (model_executor/input_batch.py): bf16 steps on packed oneDNN
weights run a bucketed number of rows, and the pad rows change no request's result."""

from __future__ import annotations

import pytest
import torch

from pagedllm.config import EngineArgs
from pagedllm.cpu_info import onednn_packs_bf16
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.model_executor.input_batch import padded_rows
from pagedllm.sampling_params import SamplingParams
from tests.utils import assert_no_leak


def test_padded_rows_round_up_to_few_buckets():
    for n in range(0, 3000):
        rows = padded_rows(n)
        if n < 16:
            assert rows == (2 if n == 1 else n)  # one row runs as two: batch-invariant
        elif n <= 512:
            assert rows % 16 == 0 and n <= rows < n + 16
        else:
            assert rows % 64 == 0 and n <= rows < n + 64
    # few distinct row counts, so oneDNN builds few GEMM kernels
    assert len({padded_rows(n) for n in range(1, 2049)}) == 14 + 32 + 24


def run_batch(model_dir: str, pad: bool) -> tuple[dict, list[tuple[int, int]]]:
    # bf16 where oneDNN packs bf16 weights (AVX-512 or AVX-NE-CONVERT), else fp32 (packed too)
    dtype = "bfloat16" if onednn_packs_bf16() else "float32"
    engine = LLMEngine(EngineArgs(model=model_dir, dtype=dtype, kv_cache_memory=4 * 2**20))
    runner = engine.runner
    assert runner.pad_rows, f"{dtype} weights are packed for oneDNN on this CPU"
    runner.pad_rows = pad
    shapes = []  # (scheduled tokens, rows the model ran)
    forward = runner.model.forward

    def recording(input_ids, positions, meta):
        shapes.append((meta.slot_mapping.shape[0], input_ids.shape[0]))
        return forward(input_ids, positions, meta)

    runner.model.forward = recording
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)
    # 21 prompts of 9..49 tokens: decode steps of 21 rows and prefill steps of odd sizes
    for i in range(21):
        engine.add_request(str(i), [(7 * i + j) % 300 + 3 for j in range(9 + 2 * i)], params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0]
    assert_no_leak(engine)
    return final, shapes


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (CPU)")
def test_pad_rows_leave_every_request_unchanged(tiny_llama_dir):
    padded, shapes = run_batch(tiny_llama_dir, pad=True)
    plain, plain_shapes = run_batch(tiny_llama_dir, pad=False)
    assert all(rows == padded_rows(n) for n, rows in shapes)
    assert any(rows > n for n, rows in shapes), "some step must have been padded"
    assert all(rows == n for n, rows in plain_shapes)
    assert padded.keys() == plain.keys() and len(padded) == 21
    for req_id, out in padded.items():
        assert out.token_ids == plain[req_id].token_ids
        for got, want, tok in zip(out.logprobs, plain[req_id].logprobs, out.token_ids):
            assert got[tok].logprob == pytest.approx(want[tok].logprob, abs=1e-2)
