"""The backend is chosen once, from the device, dtype, shapes and PAGEDLLM_CPU_ISA, owns its
limits, and is named in the start-up log; every ISA this CPU runs is built and selectable."""

from __future__ import annotations

import logging

import pytest
import torch

from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.model_executor.backends import TORCH_BACKEND, available_backends, select_backend
from pagedllm.model_executor.backends.cpu_attention import MAX_VERIFY_ROWS
from pagedllm.model_executor.ops import runnable_isas

CPU = torch.device("cpu")


def select(isa: str, head_dim: int = 64, block_size: int = 16, int8: bool = False):
    return select_backend(CPU, torch.float32, head_dim, block_size, int8, isa=isa)


def test_every_isa_this_cpu_runs_is_built_and_available():
    # make setup builds them all: a lower ISA is tested on a higher machine (avx2 on any
    # x86-64-v3 CPU, avx512 and avx512bf16 on an AMX Xeon too).
    assert [b.name for b in available_backends()] == [*runnable_isas(), "torch"]


def test_auto_takes_the_best_isa_and_names_it_in_the_log(caplog):
    with caplog.at_level(logging.INFO, logger="pagedllm.model_executor.backends.selector"):
        backend = select("auto")
    assert backend.name == (runnable_isas() or ("torch",))[0]
    assert f"backend: {backend.name} (attention:" in caplog.text


@pytest.mark.parametrize("isa", [*runnable_isas(), "torch"])
def test_each_isa_can_be_chosen(isa):
    backend = select(isa)
    assert backend.name == isa
    assert backend.attention.name == isa and backend.kernels.name == isa


def test_unknown_or_unrunnable_isa_is_a_clear_error():
    with pytest.raises(ValueError, match="PAGEDLLM_CPU_ISA must be one of"):
        select("sse2")
    missing = [isa for isa in ("amx", "avx512bf16", "avx512", "avx2") if isa not in runnable_isas()]
    for isa in missing:
        with pytest.raises(ValueError, match="this CPU cannot run it"):
            select(isa)


def test_limits_belong_to_the_backend():
    assert TORCH_BACKEND.attention.max_verify_rows is None
    for backend in available_backends()[:-1]:
        assert backend.attention.max_verify_rows == MAX_VERIFY_ROWS
        assert backend.attention.supports(64, 16, False)
        assert not backend.attention.supports(48, 16, False)  # no decode-kernel instance
        assert not backend.attention.supports(64, 5, True)  # int8 records need 16-multiples


@pytest.mark.parametrize("isa", runnable_isas())
def test_shapes_the_kernels_cannot_take_run_attention_on_torch(isa, caplog):
    with caplog.at_level(logging.WARNING):
        backend = select(isa, head_dim=48)
    assert backend.name == isa and backend.attention is TORCH_BACKEND.attention
    assert backend.kernels.name == isa  # the rest stays native
    assert "attention runs on torch" in caplog.text


def test_engine_uses_the_environment_choice(tiny_llama_dir, monkeypatch):
    for isa in [*runnable_isas(), "torch"]:
        monkeypatch.setenv("PAGEDLLM_CPU_ISA", isa)
        engine = LLMEngine(EngineArgs(model=tiny_llama_dir, kv_cache_memory=4 * 2**20))
        assert engine.runner.backend.name == isa
        # Drafts by default only where the backend's verify path pays (not AVX2's: measured).
        assert (engine.speculative_config is not None) == (isa != "avx2")
        forced = LLMEngine(
            EngineArgs(
                model=tiny_llama_dir,
                kv_cache_memory=4 * 2**20,
                speculative_config='{"method": "ngram"}',
            )
        )
        assert forced.speculative_config is not None
