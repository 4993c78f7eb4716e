"""One rank, in the engine process: what every engine ran before tensor parallelism."""

from __future__ import annotations

from pagedllm.executor.base import Executor
from pagedllm.model_executor.worker import Worker, WorkerConfig


class UniProcExecutor(Executor):
    def __init__(self, config: WorkerConfig) -> None:
        super().__init__()
        self.driver = Worker(config, rank=0)
