"""What the host CPU can do, read once from /proc/cpuinfo (Linux; empty elsewhere)."""

from __future__ import annotations

import functools
import platform


@functools.lru_cache(maxsize=1)
def cpu_flags_line() -> str:
    """The raw ``flags`` line (what -march=native code depends on)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def cpu_flags() -> set[str]:
    _, _, flags = cpu_flags_line().partition(":")
    return set(flags.split())


def has_native_bf16() -> bool:
    """bf16 dot products in hardware (AVX512-BF16, or AMX tiles): bf16 matmuls run ~8x faster
    than fp32 ones here instead of being emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
