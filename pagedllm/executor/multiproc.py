"""Tensor-parallel ranks 1..N-1 as worker processes on this machine (started with spawn, as
vLLM's mp backend), joined to rank 0 in a gloo (CPU) or NCCL (CUDA) process group over
loopback."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time

from pagedllm import envs
from pagedllm.executor.base import Executor, free_port
from pagedllm.model_executor.worker import Worker, WorkerConfig

logger = logging.getLogger(__name__)


class MultiprocExecutor(Executor):
    def __init__(self, config: WorkerConfig) -> None:
        super().__init__()
        self.world_size = config.world_size
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank is on this machine
        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = multiprocessing.get_context("spawn")
        self._procs: list[multiprocessing.Process] = []
        pipes = []
        for rank in range(1, config.world_size):
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker_main,
                args=(config, rank, init_method, sender),
                name=f"pagedllm-tp-rank{rank}",
                daemon=True,
            )
            proc.start()
            sender.close()
            self._procs.append(proc)
            pipes.append(receiver)
        try:
            self.driver = Worker(config, rank=0)
            self._wait_ready(pipes, envs.worker_start_timeout())
            self.driver.join(init_method)
        except BaseException:
            self._kill()
            raise
        threading.Thread(target=self._monitor, name="pagedllm-tp-monitor", daemon=True).start()
        logger.info(
            "tensor parallel: %d ranks (worker pids %s)",
            config.world_size,
            [p.pid for p in self._procs],
        )

    def _wait_ready(self, pipes: list, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = {proc.sentinel: (proc, pipe) for proc, pipe in zip(self._procs, pipes)}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"tensor-parallel workers did not load within {timeout:.0f} s")
            for ready in multiprocessing.connection.wait(
                [*pending, *(pipe for _, pipe in pending.values())], left
            ):
                key = next((k for k, (_, pipe) in pending.items() if ready in (k, pipe)), None)
                if key is None:
                    continue
                proc, pipe = pending.pop(key)
                kind, detail = _recv(pipe) if pipe.poll() else ("exit", "")
                if kind == "ready":
                    continue
                if kind == "exit":
                    proc.join(timeout=5)
                    detail = f"exited with code {proc.exitcode} while loading"
                raise RuntimeError(f"{proc.name} failed to start: {detail}")

    def _monitor(self) -> None:
        sentinels = {p.sentinel: p for p in self._procs}
        dead = multiprocessing.connection.wait(list(sentinels))
        proc = sentinels[dead[0]]
        self._report_failure(
            f"tensor-parallel worker {proc.name} (pid {proc.pid}) died with exit code "
            f"{proc.exitcode}"
        )

    def _shutdown(self) -> None:
        if self._failure is None:
            with contextlib.suppress(Exception):
                self.driver.tp.broadcast_object(None)
        from pagedllm.distributed import destroy_distributed

        with contextlib.suppress(Exception):
            destroy_distributed()
        for proc in self._procs:
            proc.join(timeout=5)
        self._kill()

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


def _recv(conn) -> tuple[str, str]:
    try:
        return conn.recv()
    except EOFError:
        return "error", "the worker closed its pipe"


def _worker_main(config: WorkerConfig, rank: int, init_method: str, conn) -> None:
    die_with_parent()
    logging.basicConfig(
        level=envs.log_level(), format=f"%(asctime)s rank{rank} %(levelname)s %(message)s"
    )
    try:
        worker = Worker(config, rank)
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    conn.send(("ready", str(os.getpid())))
    conn.close()
    worker.join(init_method)
    worker.serve_calls()


def die_with_parent() -> None:
    """Run in a child (before exec, or first thing): when the process that started it dies,
    even by SIGKILL, the child is killed too (Linux; elsewhere a no-op). A TP worker then does
    not wait out the collective timeout, a data-parallel replica does not outlive its front end.
    NOTE: the signal follows the starting *thread*: start children from a long-lived one."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
