"""Zeroed CPU tensors backed by transparent huge pages where the kernel offers them.

The decode kernel reads each sequence's K/V as scattered 2 KiB block slices of a multi-GiB
cache: with 4 KiB pages nearly every slice is a TLB miss whose page walk itself goes to DRAM.
2 MiB pages (``madvise(MADV_HUGEPAGE)``, honoured with THP in "madvise" or "always" mode)
made the kernel ~10% faster. Elsewhere (no THP, not Linux, GPU) it is a plain ``torch.zeros``.
"""

from __future__ import annotations

import math
import mmap

import torch


def zeros_hugepage(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass  # THP disabled: still fine, anonymous pages come zeroed
    # The tensor keeps ``buf`` alive; anonymous memory is already zero. Touching it now faults
    # the pages in at start-up rather than during the first requests.
    tensor = torch.frombuffer(buf, dtype=dtype).view(shape)
    tensor.zero_()
    return tensor
