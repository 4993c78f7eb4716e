"""What the offline benches (throughput, latency) share: building the engine from the CLI flags,
the exact-length sampling params, and the machine-load readings that go with every timing.

Timings on a shared CPU are noisy, so each result carries the process's own CPU use and the
load average: a run where the load exceeds our own use had competition.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import asdict, dataclass
from typing import Any

from pagedllm.config import EngineArgs
from pagedllm.entrypoints.bench.datasets import BenchRequest
from pagedllm.entrypoints.bench.flops import request_flops
from pagedllm.model_executor.models.hf_config import ArchConfig
from pagedllm.sampling_params import SamplingParams


def load_llm(args: EngineArgs) -> tuple[Any, float]:
    """-> (LLM, seconds to load it)."""
    from pagedllm.entrypoints.llm import LLM

    start = time.perf_counter()
    llm = LLM(**asdict(args))
    return llm, time.perf_counter() - start


def exact_params(output_len: int) -> SamplingParams:
    """Greedy, never stopping early: the request yields exactly ``output_len`` tokens."""
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


def engine_prompt(request: BenchRequest) -> str | dict[str, list[int]]:
    if isinstance(request.prompt, str):
        return request.prompt
    return {"prompt_token_ids": request.prompt}


def prompt_vocab_size(llm: Any) -> int:
    """Ids safe to draw random prompts from: those both the model and the tokenizer know."""
    return min(llm.engine.model_config.vocab_size, len(llm.get_tokenizer()))


def model_shape(llm: Any) -> ArchConfig | None:
    try:
        return llm.engine.runner.arch
    except AttributeError:
        return None


def useful_flops(shape: ArchConfig, lengths: list[tuple[int, int]]) -> float:
    """FLOPs of (prompt_len, output_len) pairs, as if every request ran alone without waste."""
    return sum(request_flops(shape, p, o) for p, o in lengths)


@dataclass
class CpuWatch:
    """The process's CPU seconds and the load average around a timed section."""

    cpu_start: float = 0.0
    load_start: float = 0.0
    cpu_seconds: float = 0.0
    load_end: float = 0.0

    def __enter__(self) -> CpuWatch:
        self.cpu_start = _own_cpu_seconds()
        self.load_start = os.getloadavg()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu_seconds = _own_cpu_seconds() - self.cpu_start
        self.load_end = os.getloadavg()[0]

    def as_dict(self, elapsed: float) -> dict[str, Any]:
        return {
            "own_cpu_s": self.cpu_seconds,
            "own_cpu_util_cores": self.cpu_seconds / elapsed if elapsed > 0 else 0.0,
            "ncpu": os.cpu_count(),
            "loadavg_1m_before_after": [self.load_start, self.load_end],
        }


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
