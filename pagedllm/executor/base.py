"""Executor: runs calls on every tensor-parallel rank of one engine. Rank 0's Worker lives in
the engine process; the others receive each call by a torch.distributed broadcast from it (the
same collective channel their layers use), so a step costs one broadcast of the scheduler
output plus the layers' all-reduces."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pagedllm.model_executor.worker import Worker, gather_to_driver

logger = logging.getLogger(__name__)

EXECUTOR_BACKENDS = ("uni", "mp", "ray")
# How long a failed collective waits for the monitor to report a dead worker before it is
# taken for an ordinary error.
WORKER_DEATH_GRACE_S = 2.0


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker is gone: the engine cannot step any more."""


class Executor:
    driver: Worker
    world_size: int = 1

    def __init__(self) -> None:
        self._failure: str | None = None
        self._failure_callbacks: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def runner(self):
        """Rank 0's model runner (its backend, arch and request state are every rank's)."""
        return self.driver.runner

    def collective_rpc(self, method: str, *args: Any, all_ranks: bool = False) -> list[Any]:
        """Call ``method`` on every rank. -> [rank 0's result], or every rank's with
        ``all_ranks``."""
        self.check_health()
        if self.world_size > 1:
            try:
                self.driver.tp.broadcast_object((method, args, all_ranks))
                result = getattr(self.driver, method)(*args)
                if all_ranks:
                    return gather_to_driver(result, self.driver.tp)
            except Exception as exc:
                # A peer gone mid-collective makes gloo raise here, often before the monitor
                # has seen the process exit: give it a moment to say so.
                deadline = time.monotonic() + WORKER_DEATH_GRACE_S
                while self._failure is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self._failure is not None:
                    raise WorkerDiedError(f"{self._failure} ({exc})") from exc
                raise
            return [result]
        return [getattr(self.driver, method)(*args)]

    def execute_model(self, scheduler_output):
        return self.collective_rpc("execute_model", scheduler_output)[0]

    # ---- faults --------------------------------------------------------------------------------
    def on_failure(self, callback: Callable[[str], None]) -> None:
        """``callback(reason)`` once a worker dies (from a monitor thread)."""
        with self._lock:
            self._failure_callbacks.append(callback)
            failure = self._failure
        if failure is not None:
            callback(failure)

    def check_health(self) -> None:
        if self._failure is not None:
            raise WorkerDiedError(self._failure)

    def _report_failure(self, reason: str) -> None:
        with self._lock:
            if self._failure is not None or self._closed:
                return
            self._failure = reason
            callbacks = list(self._failure_callbacks)
        logger.error("%s", reason)
        for callback in callbacks:
            callback(reason)

    def shutdown(self) -> None:
        """Stop the workers (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for the process group's rendezvous."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
