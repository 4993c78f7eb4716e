"""Native CPU kernels: C++ libraries built at set-up time, one per ISA (loader.py), each called
through one Python wrapper per op (native.py). Which ISA serves a model is the backend
selector's choice (model_executor/backends/selector.py), made once."""

from pagedllm.model_executor.ops.loader import runnable_isas
from pagedllm.model_executor.ops.native import NativeOps, native_ops

__all__ = ["NativeOps", "native_ops", "runnable_isas"]
