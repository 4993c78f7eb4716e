"""Executors: how the engine's model runs, on one rank or many. The engine talks to one
Executor; which one is chosen here, once, from ``--distributed-executor-backend``."""

from __future__ import annotations

from pagedllm.executor.base import EXECUTOR_BACKENDS, Executor, WorkerDiedError
from pagedllm.model_executor.worker import WorkerConfig


def create_executor(
    config: WorkerConfig, backend: str | None, ray_address: str | None = None
) -> Executor:
    """``backend``: uni (in-process, one rank), mp (worker processes) or ray (Ray actors);
    None: uni for one rank, else mp."""
    backend = backend or ("uni" if config.world_size == 1 else "mp")
    if backend == "uni":
        if config.world_size != 1:
            raise ValueError(
                "--distributed-executor-backend uni runs one rank: use mp or ray for "
                f"--tensor-parallel-size {config.world_size}"
            )
        from pagedllm.executor.uniproc import UniProcExecutor

        return UniProcExecutor(config)
    if backend == "mp":
        from pagedllm.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    if backend == "ray":
        from pagedllm.executor.ray_executor import RayExecutor

        return RayExecutor(config, ray_address)
    raise ValueError(
        f"--distributed-executor-backend must be one of {EXECUTOR_BACKENDS}, got {backend!r}"
    )


__all__ = ["EXECUTOR_BACKENDS", "Executor", "WorkerDiedError", "create_executor"]
