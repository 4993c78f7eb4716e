"""Choose the backend once, from the device, the model's dtype and shapes, and the CPU's ISA.

``PAGEDLLM_CPU_ISA`` (auto | amx | avx512bf16 | avx512 | avx2 | torch) picks a lower ISA on a
higher machine, or the torch backend; ``auto`` takes the best ISA this CPU runs whose kernels are
built. A model the native attention kernels cannot take (a head size they have no instance for,
an int8 cache with a block size that is not a multiple of 16) runs its attention on torch, and
the log says so.
"""

from __future__ import annotations

import logging

import torch

from pagedllm import envs
from pagedllm.model_executor.backends.base import TORCH_BACKEND, Backend
from pagedllm.model_executor.backends.batch_invariant import batch_invariant
from pagedllm.model_executor.backends.cpu_attention import NativeAttentionBackend
from pagedllm.model_executor.backends.kernels import NativeKernels
from pagedllm.model_executor.backends.linear import NativeLinearBackend
from pagedllm.model_executor.ops import native_ops, runnable_isas
from pagedllm.model_executor.ops.loader import ISAS

logger = logging.getLogger(__name__)

CPU_ISA_CHOICES = ("auto", *ISAS, "torch")


def native_backend(isa: str, dtype: torch.dtype) -> Backend | None:
    """The backend on ``isa``'s kernels, or None where they are not built or cannot run here."""
    ops = native_ops(isa)
    if ops is None:
        return None
    return Backend(
        isa,
        NativeAttentionBackend(ops, dtype),
        NativeLinearBackend(ops),
        NativeKernels(ops),
    )


def available_backends(dtype: torch.dtype = torch.float32) -> list[Backend]:
    """Every backend this machine can run, best first, the torch one last (for tests)."""
    found = [native_backend(isa, dtype) for isa in runnable_isas()]
    return [b for b in found if b is not None] + [TORCH_BACKEND]


def select_backend(
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    block_size: int,
    int8_cache: bool,
    isa: str | None = None,
    backend: Backend | None = None,
    deterministic: bool = False,
) -> Backend:
    """The backend for this model: ``backend`` if given (tests pin one), else the best the
    device and ``isa`` (default: PAGEDLLM_CPU_ISA) allow; either way with torch attention where
    its attention kernels cannot take the model's shapes. ``deterministic``: that ISA's
    batch-invariant variant (backends/batch_invariant.py)."""
    if backend is None:
        backend = _pick(device, dtype, envs.cpu_isa() if isa is None else isa)
    if deterministic:
        backend = batch_invariant(backend, dtype)
        if not backend.attention.supports(head_dim, block_size, int8_cache):
            raise ValueError(
                f"--deterministic: the {backend.name} decode kernel does not take head_dim "
                f"{head_dim} with block size {block_size}"
                f"{' and an int8 cache' if int8_cache else ''}"
            )
    if not backend.attention.supports(head_dim, block_size, int8_cache):
        logger.warning(
            "the %s attention kernels do not take head_dim %d with block size %d%s: attention "
            "runs on torch",
            backend.name,
            head_dim,
            block_size,
            " and an int8 cache" if int8_cache else "",
        )
        backend = Backend(backend.name, TORCH_BACKEND.attention, backend.linear, backend.kernels)
    logger.info("backend: %s", backend.describe())
    return backend


def _pick(device: torch.device, dtype: torch.dtype, isa: str) -> Backend:
    if isa not in CPU_ISA_CHOICES:
        raise ValueError(f"PAGEDLLM_CPU_ISA must be one of {', '.join(CPU_ISA_CHOICES)}: {isa!r}")
    backend = TORCH_BACKEND
    if device.type == "cpu" and isa != "torch":
        if isa == "auto":
            candidates = runnable_isas()
        elif isa in runnable_isas():
            candidates = (isa,)
        else:
            raise ValueError(
                f"PAGEDLLM_CPU_ISA={isa}: this CPU cannot run it (it runs: "
                f"{', '.join(runnable_isas()) or 'none'}, and torch)"
            )
        for name in candidates:
            found = native_backend(name, dtype)
            if found is not None:
                backend = found
                break
        else:
            if isa != "auto":
                raise ValueError(
                    f"PAGEDLLM_CPU_ISA={isa}: its kernels are not built; run "
                    f"`python -m pagedllm.model_executor.ops.build {isa}`"
                )
    return backend
