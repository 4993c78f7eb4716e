"""Kernel backends, chosen once per engine (selector.py): torch, and one native CPU backend per
ISA (avx2, avx512, avx512bf16, amx). docs/architecture.md says how to add one."""

from pagedllm.model_executor.backends.base import TORCH_BACKEND, Backend
from pagedllm.model_executor.backends.selector import available_backends, select_backend

__all__ = ["TORCH_BACKEND", "Backend", "available_backends", "select_backend"]
