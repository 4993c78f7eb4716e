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


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The model name with family and model ("AMD EPYC (family 26, model 2)"): what a
    benchmark figure is reported beside (a VM may show a bare "AMD EPYC")."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break  # the first CPU's block is enough
    except OSError:
        return platform.processor()
    return (
        f"{fields.get('model name', platform.processor())} (family {fields.get('cpu family', '?')}"
        f", model {fields.get('model', '?')})"
    )


def cpu_flags() -> set[str]:
    _, _, flags = cpu_flags_line().partition(":")
    return set(flags.split())


def has_native_bf16() -> bool:
    """bf16 dot products in hardware (AVX512-BF16, or AMX tiles): bf16 matmuls run ~8x faster
    than fp32 ones here instead of being emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def onednn_packs_bf16() -> bool:
    """oneDNN's pre-packed bf16 linear weights need AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT;
    torch refuses the reorder on an AVX2-only CPU."""
    flags = cpu_flags()
    return {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
