"""Native CPU kernels (a C++ extension built at set-up time), with pure-torch fallbacks.

The extension is compiled by ``python -m pagedllm.model_executor.ops.build`` (``make setup``
runs it), never silently at the first request. At run time ``native_ops_available()`` loads it
if a build matching this source, torch and CPU exists; otherwise callers use the torch path.
"""

import torch

from pagedllm.model_executor.ops.loader import native_ops_available


def use_native(t: torch.Tensor) -> bool:
    """Whether the native CPU kernels can take this tensor."""
    return t.device.type == "cpu" and native_ops_available()


__all__ = ["native_ops_available", "use_native"]
