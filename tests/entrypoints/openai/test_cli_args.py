"""`pagedllm serve` defaults its step budget to SERVE_MAX_NUM_BATCHED_TOKENS (shorter prefill
chunks than offline) unless the user sets one or turns chunked prefill off."""

from __future__ import annotations

from pagedllm.entrypoints.openai.cli_args import (
    SERVE_MAX_NUM_BATCHED_TOKENS,
    config_from_namespace,
    make_arg_parser,
)


def _engine_args(argv: list[str]):
    return config_from_namespace(make_arg_parser().parse_args(argv))[1]


def test_serve_step_budget_default_and_overrides():
    assert SERVE_MAX_NUM_BATCHED_TOKENS == 512
    assert _engine_args([]).max_num_batched_tokens == SERVE_MAX_NUM_BATCHED_TOKENS
    assert _engine_args(["--max-num-batched-tokens", "4096"]).max_num_batched_tokens == 4096
    # Without chunked prefill a step must hold a whole prompt: the engine picks the budget.
    assert _engine_args(["--no-enable-chunked-prefill"]).max_num_batched_tokens is None


def test_kv_cache_dtype_flag():
    assert _engine_args([]).kv_cache_dtype == "auto"
    assert _engine_args(["--kv-cache-dtype", "int8"]).kv_cache_dtype == "int8"
    assert _engine_args(["--kv-cache-dtype", "bfloat16"]).kv_cache_dtype == "bfloat16"


def test_quantization_flag():
    assert _engine_args([]).quantization is None
    assert _engine_args(["--quantization", "int8"]).quantization == "int8"
