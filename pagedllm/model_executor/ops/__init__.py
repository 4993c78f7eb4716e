"""Native CPU kernels (a C++ extension built at set-up time), with pure-torch fallbacks.

The extension is compiled by ``python -m pagedllm.model_executor.ops.build`` (``make setup``
runs it), never silently at the first request. At run time ``native_ops_available()`` loads it
if a build matching this source, torch and CPU exists; otherwise callers use the torch path.
"""

from pagedllm.model_executor.ops.loader import native_ops_available

__all__ = ["native_ops_available"]
