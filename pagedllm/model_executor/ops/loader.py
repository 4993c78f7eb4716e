"""Find (or build) the C++ extension for this source, torch version and CPU."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys

import torch

from pagedllm import envs
from pagedllm.cpu_info import cpu_flags_line

logger = logging.getLogger(__name__)

NAME = "pagedllm_ops"
SOURCES = (
    "paged_attention.cpp",
    "paged_attention_multi.cpp",
    "amx.cpp",
    "prefill_attention.cpp",
    "amx_linear.cpp",
    "fused_ops.cpp",
    "argmax.cpp",
    "int8_linear.cpp",
)
# -fno-trapping-math lets float->int conversions vectorize (the kernels' exp); no FP traps are used.
CFLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fopenmp",
    "-ffp-contract=fast",
    "-fno-math-errno",
    "-fno-trapping-math",
)


def _source_paths() -> list[str]:
    here = os.path.join(os.path.dirname(__file__), "csrc")
    return [os.path.join(here, s) for s in SOURCES]


def _cpu_key() -> str:
    """-march=native code must not run on a CPU without the same instructions."""
    return cpu_flags_line()


def build_dir() -> str:
    h = hashlib.sha256()
    here = os.path.join(os.path.dirname(__file__), "csrc")
    for path in sorted(os.path.join(here, n) for n in os.listdir(here)):  # sources and headers
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(torch.__version__.encode())
    h.update(_cpu_key().encode())
    h.update(" ".join(CFLAGS).encode())
    return os.path.join(envs.cache_dir(), "ops", h.hexdigest()[:16])


def library_path() -> str:
    return os.path.join(build_dir(), f"{NAME}.so")


def build(verbose: bool = False) -> str:
    from torch.utils import cpp_extension

    # The `ninja` wheel installs next to this interpreter, which may not be on PATH.
    bin_dir = os.path.dirname(sys.executable)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    out = build_dir()
    os.makedirs(out, exist_ok=True)
    cpp_extension.load(
        name=NAME,
        sources=_source_paths(),
        extra_cflags=list(CFLAGS),
        extra_ldflags=["-fopenmp"],
        build_directory=out,
        is_python_module=False,
        verbose=verbose,
    )
    return library_path()


@functools.lru_cache(maxsize=1)
def native_ops_available() -> bool:
    if envs.disable_native_ops():
        return False
    path = library_path()
    if not os.path.exists(path):
        logger.warning(
            "native CPU kernels are not built for this machine (%s); using the slower torch "
            "fallback. Build them with `make setup` or "
            "`python -m pagedllm.model_executor.ops.build`.",
            path,
        )
        return False
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as exc:
        logger.warning("could not load native kernels from %s (%s); using torch", path, exc)
        return False
    return True
