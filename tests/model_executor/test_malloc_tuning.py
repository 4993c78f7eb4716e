"""glibc accepts the malloc settings that keep prefill activations from being page-faulted in
afresh every layer (the prefill-step speed-up itself is a benchmark figure, not a test)."""

from __future__ import annotations

import ctypes.util
import platform
import sys

import pytest

from pagedllm.model_executor.malloc_tuning import tune_glibc_malloc


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc only",
)
def test_glibc_takes_the_settings():
    assert ctypes.util.find_library("c")
    assert tune_glibc_malloc() is True
