"""Build and load the C++ kernels, one library per CPU ISA.

Each ISA is compiled for its own instruction set (never ``-march=native``) into its own op
namespace, ``torch.ops.pagedllm_<isa>``, so one machine builds, loads and tests every ISA it
can execute: an AMX Xeon runs the avx512bf16, avx512 and avx2 libraries too, a Zen 4 runs
avx512bf16, avx512 and avx2, an Ice Lake (or a VM that hides AVX512-BF16) avx512 and avx2.

    avx2        x86-64-v3 (AVX2 + FMA), 256-bit vectors
    avx512      x86-64-v4 (AVX-512 F/BW/VL/DQ), 512-bit vectors, bf16 converted to fp32 for FMAs
    avx512bf16  avx512 + AVX-512-BF16/VNNI: bf16 dot products on vdpbf16ps
    amx         avx512bf16 + AMX tiles (the AMX kernels compile only here)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys

import torch

from pagedllm import envs
from pagedllm.cpu_info import cpu_flags

logger = logging.getLogger(__name__)

# Normalised: the path is part of the build hash (and -I), and a script that imports the
# package through "../" must find the same build.
CSRC = os.path.join(os.path.dirname(os.path.realpath(__file__)), "csrc")
SOURCES = (
    "registration.cpp",
    "generic/paged_attention.cpp",
    "generic/paged_attention_multi.cpp",
    "generic/fused_ops.cpp",
    "generic/prefill_attention.cpp",
    "generic/argmax.cpp",
    "generic/token_bitmask.cpp",
    "generic/lora.cpp",
    "generic/small_linear.cpp",
    "generic/int8_linear.cpp",
    "generic/quant_linear.cpp",
    "generic/batch_invariant_linear.cpp",
    "x86/amx/amx_prefill_attention.cpp",
    "x86/amx/amx_linear.cpp",
)
# -fno-trapping-math lets float->int conversions vectorize (the kernels' exp); no FP traps are used.
COMMON_CFLAGS = (
    "-O3",
    "-fopenmp",
    "-ffp-contract=fast",
    "-fno-math-errno",
    "-fno-trapping-math",
)
_AVX512 = ("-march=x86-64-v4", "-mprefer-vector-width=512")
_AVX512BF16 = (*_AVX512, "-mavx512bf16", "-mavx512vnni")
ISA_CFLAGS = {
    "avx2": ("-march=x86-64-v3", "-mprefer-vector-width=256"),
    "avx512": _AVX512,
    "avx512bf16": _AVX512BF16,
    "amx": (*_AVX512BF16, "-mamx-tile", "-mamx-bf16", "-mamx-int8"),
}
# What a CPU must report (/proc/cpuinfo flags) to run each ISA's library.
ISA_CPU_FLAGS = {
    "avx2": {"avx2", "fma", "f16c", "bmi2"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512bf16": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"},
    "amx": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_bf16", "amx_tile"},
}
ISAS = ("amx", "avx512bf16", "avx512", "avx2")  # best first


def runnable_isas() -> tuple[str, ...]:
    """The ISAs this CPU can execute, best first."""
    flags = cpu_flags()
    return tuple(isa for isa in ISAS if ISA_CPU_FLAGS[isa] <= flags)


def namespace(isa: str) -> str:
    return f"pagedllm_{isa}"


def _cflags(isa: str) -> list[str]:
    return [*COMMON_CFLAGS, *ISA_CFLAGS[isa], f"-DPAGEDLLM_NS={namespace(isa)}", f"-I{CSRC}"]


def build_dir(isa: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(CSRC)):
        for name in sorted(files):  # sources and headers
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    h.update(torch.__version__.encode())
    h.update(" ".join(_cflags(isa)).encode())
    return os.path.join(envs.kernel_dir(), f"{isa}-{h.hexdigest()[:16]}")


def library_path(isa: str) -> str:
    return os.path.join(build_dir(isa), f"{namespace(isa)}.so")


def build(isa: str, verbose: bool = False) -> str:
    from torch.utils import cpp_extension

    # The `ninja` wheel installs next to this interpreter, which may not be on PATH.
    bin_dir = os.path.dirname(sys.executable)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    out = build_dir(isa)
    os.makedirs(out, exist_ok=True)
    cpp_extension.load(
        name=namespace(isa),
        sources=[os.path.join(CSRC, s) for s in SOURCES],
        extra_cflags=_cflags(isa),
        extra_ldflags=["-fopenmp"],
        build_directory=out,
        is_python_module=False,
        verbose=verbose,
    )
    return library_path(isa)


@functools.cache
def load_library(isa: str) -> bool:
    """Load the ISA's library (once); False, with a warning, if it is not built or cannot run."""
    if isa not in runnable_isas():
        return False
    path = library_path(isa)
    if not os.path.exists(path):
        logger.warning(
            "the %s kernels are not built (%s); build them with `make setup` or "
            "`python -m pagedllm.model_executor.ops.build`",
            isa,
            path,
        )
        return False
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as exc:
        logger.warning("could not load the %s kernels from %s (%s)", isa, path, exc)
        return False
    return True
