"""Every environment variable pagedllm reads, in one place (prefixed ``PAGEDLLM_``, or vLLM's
name where users already set it)."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """Where downloaded models (the embedded default model) are kept."""
    return os.path.expanduser(os.environ.get("PAGEDLLM_CACHE_DIR", "~/.cache/pagedllm"))


def kernel_dir() -> str:
    """Where the native kernels are built and loaded from (one folder per ISA and source
    hash): PAGEDLLM_KERNEL_DIR, else ``ops/`` in the cache dir. A container image sets it
    outside the model cache volume, so mounting that volume does not hide the kernels."""
    return os.path.expanduser(
        os.environ.get("PAGEDLLM_KERNEL_DIR") or os.path.join(cache_dir(), "ops")
    )


def kv_cache_memory() -> int | None:
    """CPU KV-cache budget in bytes, like vLLM's VLLM_CPU_KVCACHE_SPACE (which is in GiB)."""
    value = os.environ.get("PAGEDLLM_KV_CACHE_MEMORY")
    return int(value) if value else None


def log_level() -> str:
    return os.environ.get("PAGEDLLM_LOG_LEVEL", "INFO")


def cpu_isa() -> str:
    """Which CPU kernels to run: ``auto`` (the best this CPU runs and set-up built), ``amx``,
    ``avx512bf16``, ``avx512``, ``avx2``, or ``torch`` (no native kernels: comparisons and
    debugging)."""
    return os.environ.get("PAGEDLLM_CPU_ISA", "auto").strip().lower() or "auto"


def api_key() -> str | None:
    """The server's API key (``pagedllm serve --api-key`` wins); unset or empty = no auth."""
    return os.environ.get("PAGEDLLM_API_KEY") or None


def metrics_api_key() -> str | None:
    """The key /metrics requires (``--metrics-api-key`` wins); unset = the API key, if any."""
    return os.environ.get("PAGEDLLM_METRICS_API_KEY") or None


def cpu_threads_bind() -> tuple[tuple[int, ...], ...] | None:
    """Per-rank CPU cores for tensor-parallel workers, like vLLM's VLLM_CPU_OMP_THREADS_BIND:
    ``"0-3|4-7"`` pins rank 0 to cores 0-3 and rank 1 to 4-7 (lists like ``0,2,4`` work too).
    Unset or ``auto``: the cores split evenly."""
    value = os.environ.get("PAGEDLLM_CPU_THREADS_BIND", "auto").strip()
    if value in ("", "auto"):
        return None
    ranks = []
    for part in value.split("|"):
        cores: list[int] = []
        for item in part.split(","):
            lo, _, hi = item.strip().partition("-")
            try:
                cores += range(int(lo), int(hi or lo) + 1)
            except ValueError:
                raise ValueError(
                    f"PAGEDLLM_CPU_THREADS_BIND={value!r}: expected core lists like '0-3|4-7'"
                ) from None
        ranks.append(tuple(cores))
    return tuple(ranks)


def worker_start_timeout() -> float:
    """Seconds tensor-parallel workers may take to load their weights."""
    return float(os.environ.get("PAGEDLLM_WORKER_START_TIMEOUT", "600"))


def dist_timeout() -> float:
    """Seconds a torch.distributed collective may wait for a peer before it fails."""
    return float(os.environ.get("PAGEDLLM_DIST_TIMEOUT", "120"))


def allow_runtime_lora_updating() -> bool:
    """vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING: serve the LoRA load/unload routes."""
    return os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true")
