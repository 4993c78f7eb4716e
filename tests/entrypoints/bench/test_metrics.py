"""The pure arithmetic of the bench tools: percentiles, goodput, Poisson arrivals, FLOPs."""

from __future__ import annotations

import math

import pytest

from pagedllm.entrypoints.bench.arrivals import arrival_offsets
from pagedllm.entrypoints.bench.flops import (
    SMOLLM2_135M,
    body_params,
    flops_per_token,
    lm_head_params,
    request_flops,
)
from pagedllm.entrypoints.bench.metrics import LatencySummary, count_good, parse_goodput
from pagedllm.entrypoints.bench.openai_client import RequestResult
from pagedllm.entrypoints.bench.serve import summarize
from pagedllm.model_executor.models.hf_config import arch_config_from_hf


def test_latency_summary():
    s = LatencySummary.of([float(v) for v in range(1, 101)])  # 1..100
    assert s.mean == pytest.approx(50.5)
    assert s.median == pytest.approx(50.5)
    assert s.percentiles[99] == pytest.approx(99.01)
    assert s.percentiles[90] == pytest.approx(90.1)
    assert s.as_flat_dict("ttft")["p95_ttft_ms"] == pytest.approx(95.05)
    assert LatencySummary.of([]).mean == 0.0


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "TPOT:100.5"]) == {"ttft": 500.0, "tpot": 100.5}
    assert parse_goodput(None) == {}
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["e2el:0"]):
        with pytest.raises(ValueError, match="goodput"):
            parse_goodput(bad)


def test_count_good_needs_every_bound():
    reqs = [
        {"ttft": 100.0, "tpot": 10.0, "e2el": 1000.0},  # good
        {"ttft": 600.0, "tpot": 10.0, "e2el": 1000.0},  # TTFT too slow
        {"ttft": 500.0, "tpot": 50.0, "e2el": 1000.0},  # exactly on both bounds: good
        {"ttft": 100.0, "tpot": 51.0, "e2el": 1000.0},  # TPOT too slow
    ]
    assert count_good(reqs, {"ttft": 500.0, "tpot": 50.0}) == 2
    assert count_good(reqs, {"e2el": 999.0}) == 0
    assert count_good(reqs, {}) == 4


def _result(ttft: float, latency: float, tokens: int, ok: bool = True) -> RequestResult:
    gaps = [(latency - ttft) / (tokens - 1)] * (tokens - 1) if ok else []
    return RequestResult(
        success=ok,
        prompt_len=10,
        output_tokens=tokens if ok else 0,
        ttft=ttft,
        latency=latency,
        itl=gaps,
        error="" if ok else "boom",
    )


def test_summarize_synthetic_run():
    results = [
        _result(ttft=0.1, latency=1.0, tokens=10),  # tpot 100 ms
        _result(ttft=0.2, latency=0.6, tokens=5),  # tpot 100 ms
        _result(ttft=0.9, latency=1.8, tokens=10),  # TTFT misses a 500 ms SLO
        _result(ttft=0.0, latency=0.0, tokens=0, ok=False),
    ]
    s = summarize(results, duration=2.0, slo_ms={"ttft": 500.0, "tpot": 101.0})
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["total_output_tokens"] == 25 and s["total_input_tokens"] == 30
    assert s["output_throughput"] == pytest.approx(12.5)
    assert s["total_token_throughput"] == pytest.approx(27.5)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["num_good_requests"] == 2
    assert s["request_goodput"] == pytest.approx(1.0)
    assert s["mean_ttft_ms"] == pytest.approx(400.0)
    assert s["median_tpot_ms"] == pytest.approx(100.0)
    assert s["mean_itl_ms"] == pytest.approx(100.0)
    assert s["errors"] == ["boom"]
    assert summarize(results, 2.0)["request_goodput"] is None


def test_tpot_of_one_token_output_is_zero():
    assert RequestResult(success=True, output_tokens=1, ttft=0.5, latency=0.5).tpot == 0.0


def test_arrivals_all_at_once_for_infinite_rate():
    assert arrival_offsets(4, math.inf) == [0.0] * 4
    assert arrival_offsets(0, 5.0) == []


def test_poisson_arrivals_seeded_with_the_right_mean_rate():
    offsets = arrival_offsets(20000, request_rate=8.0, seed=1)
    assert offsets[0] == 0.0
    assert all(b >= a for a, b in zip(offsets, offsets[1:], strict=False))
    rate = (len(offsets) - 1) / offsets[-1]
    assert rate == pytest.approx(8.0, rel=0.03)
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    # Exponential gaps: the standard deviation equals the mean.
    mean = sum(gaps) / len(gaps)
    std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    assert std == pytest.approx(mean, rel=0.05)
    assert offsets == arrival_offsets(20000, 8.0, seed=1)
    assert offsets != arrival_offsets(20000, 8.0, seed=2)


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_arrivals_reject_non_positive_rates(rate):
    with pytest.raises(ValueError, match="request-rate"):
        arrival_offsets(3, rate)


def test_flops_shape_matches_the_model_s_linear_weights(tiny_llama_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    arch = arch_config_from_hf(config)
    assert body_params(arch) + lm_head_params(arch) == linear


def test_smollm2_flops_per_token():
    # 134.5M matmul weights (30 layers x 3.54M + the 28.3M LM head) -> 2 FLOPs each.
    assert body_params(SMOLLM2_135M) == 30 * 3_538_944
    assert lm_head_params(SMOLLM2_135M) == 49152 * 576
    assert flops_per_token(SMOLLM2_135M, 0) == pytest.approx(2 * 134_479_872)
    assert flops_per_token(SMOLLM2_135M, 1000) - flops_per_token(SMOLLM2_135M, 0) == (
        4 * 30 * 9 * 64 * 1000
    )


def test_request_flops_sums_the_per_token_figures():
    shape = SMOLLM2_135M
    assert request_flops(shape, 1, 1) == pytest.approx(flops_per_token(shape, 1))
    prompt_len, output_len = 7, 5
    per_token = sum(flops_per_token(shape, c) for c in range(1, prompt_len + output_len))
    # The LM head runs once per output token, not for every prompt token.
    expected = per_token - (prompt_len - 1) * 2 * lm_head_params(shape)
    assert request_flops(shape, prompt_len, output_len) == pytest.approx(expected)
    with pytest.raises(ValueError):
        request_flops(shape, 0, 1)
