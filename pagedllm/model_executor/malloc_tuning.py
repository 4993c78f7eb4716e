"""Keep glibc from handing large activation buffers back to the kernel after every op.

A prefill step allocates and frees MB-sized activations in every layer. By default glibc serves
them with fresh mmaps or trims them off the heap top, so each layer page-faults its buffers in
again and the kernel zeroes them. With a fixed 32 MiB mmap threshold and no trimming, freed
memory is reused: a 2,048-token prefill step (8 x 256, bf16) went from ~445 to ~305 ms, and
the whole offline workload from 803/810 to 841/818 tok/s (alternated runs). The process keeps
its peak activation memory, which a server wants anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's maximum on 64-bit
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: trim only past 2 GiB free at the top


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, loaded once; None off Linux or where it cannot be loaded."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_memory() -> None:
    """Hand the heap's free memory back to the OS (malloc_trim), past the no-trim setting above:
    after a one-off large job (a huge prompt tokenized) that should not stay resident."""
    libc = _glibc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def tune_glibc_malloc() -> bool:
    """-> whether the settings took (only on Linux with glibc)."""
    libc = _glibc()
    try:
        mallopt = libc.mallopt  # type: ignore[union-attr]
    except AttributeError:
        return False  # no libc, or not glibc (musl has no mallopt)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    if not ok:
        logger.debug("mallopt refused the settings")
    return ok
