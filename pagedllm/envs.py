"""Every environment variable pagedllm reads, in one place (all prefixed ``PAGEDLLM_``)."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """Where downloaded models (the embedded default model) are kept."""
    return os.path.expanduser(os.environ.get("PAGEDLLM_CACHE_DIR", "~/.cache/pagedllm"))


def kv_cache_memory() -> int | None:
    """CPU KV-cache budget in bytes, like vLLM's VLLM_CPU_KVCACHE_SPACE (which is in GiB)."""
    value = os.environ.get("PAGEDLLM_KV_CACHE_MEMORY")
    return int(value) if value else None


def log_level() -> str:
    return os.environ.get("PAGEDLLM_LOG_LEVEL", "INFO")


def cpu_isa() -> str:
    """Which CPU kernels to run: ``auto`` (the best this CPU runs and set-up built), ``amx``,
    ``avx512``, ``avx2``, or ``torch`` (no native kernels: comparisons and debugging)."""
    return os.environ.get("PAGEDLLM_CPU_ISA", "auto").strip().lower() or "auto"


def api_key() -> str | None:
    """The server's API key (``pagedllm serve --api-key`` wins); unset or empty = no auth."""
    return os.environ.get("PAGEDLLM_API_KEY") or None


def metrics_api_key() -> str | None:
    """The key /metrics requires (``--metrics-api-key`` wins); unset = the API key, if any."""
    return os.environ.get("PAGEDLLM_METRICS_API_KEY") or None
