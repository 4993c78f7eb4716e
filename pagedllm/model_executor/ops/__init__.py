"""Native CPU kernels (a C++ extension built at set-up time), with pure-torch fallbacks.

The extension is compiled by ``python -m pagedllm.model_executor.ops.build`` (``make setup``
runs it), never silently at the first request. At run time ``native_ops_available()`` loads it
if a build matching this source, torch and CPU exists; otherwise callers use the torch path.
"""

from functools import cache

import torch

from pagedllm.model_executor.ops.loader import native_ops_available


def use_native(t: torch.Tensor) -> bool:
    """Whether the native CPU kernels can take this tensor."""
    return t.device.type == "cpu" and native_ops_available()


@cache
def amx_available() -> bool:
    """Whether the native AMX kernels (prefill attention, amx_linear) can run on this CPU."""
    return native_ops_available() and torch.ops.pagedllm.amx_supported()


__all__ = ["amx_available", "native_ops_available", "use_native"]
