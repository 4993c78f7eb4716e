"""GracefulServer: uvicorn's Server with pagedllm's start-up report and graceful drain.

On the first SIGTERM/SIGINT the server keeps its socket open but answers new requests (and
/health) with 503, waits for in-flight requests (streams included) to finish, for at most
``shutdown_timeout`` seconds, then aborts what is left (each gets a 503 JSON error, or an error
event if it streams), stops the engine and exits 0. A second signal stops waiting: it aborts
in-flight requests at once. A request whose body is still being read when the drain starts gets
its 503 at once (read_timeouts.py), so a stalled client cannot hold the drain.

    signal -> draining (503s) -> in-flight == 0 or timeout -> abort rest -> uvicorn shutdown
"""

from __future__ import annotations

import logging
import socket
import time
from types import FrameType

import uvicorn

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.middleware import ServerState
from pagedllm.executor import WorkerDiedError

logger = logging.getLogger(__name__)

# Once drained (or aborted), how long uvicorn may take to flush responses and close connections.
FINAL_FLUSH_TIMEOUT_S = 5
# A tensor-parallel worker lost while serving leaves the engine unable to step: the server
# answers 500s (and /health 500) this long, for in-flight streams to get their error event and
# probes to see it, then exits 1 so a supervisor (systemd, Kubernetes) starts it afresh.
WORKER_LOST_EXIT_DELAY_S = 3.0
# What a request still unfinished at shutdown is told (HTTP 503, or an error event if streaming).
SHUTDOWN_ABORT_REASON = "the server shut down before this request finished; retry it"


class GracefulServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        engine: AsyncLLM,
        state: ServerState,
        url: str,
        served_model_name: str,
        shutdown_timeout: float,
    ) -> None:
        super().__init__(config)
        self.engine = engine
        self.state = state
        self.url = url
        self.served_model_name = served_model_name
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self._drain_deadline: float | None = None
        self._announced_ready = False
        self._num_signals = 0
        self._worker_lost_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # NOTE: runs in a signal handler; it only sets flags (and SimpleQueue.put is reentrant).
        # Unlike uvicorn's, it does not re-raise the signal after shutdown: a drain exits 0.
        self._num_signals += 1
        if self._num_signals == 1:
            self.begin_drain()
        elif self._num_signals == 2:
            self.engine.abort_all(SHUTDOWN_ABORT_REASON)
            self.should_exit = True
        else:
            self.force_exit = True

    def begin_drain(self) -> None:
        """Stop taking requests; exit once in-flight ones finish (callable from any thread)."""
        self.state.draining = True
        self._drain_deadline = time.monotonic() + self.shutdown_timeout

    async def on_tick(self, counter: int) -> bool:
        if self.engine.failed_to_load:
            logger.error("the engine failed to load: %s", self.engine.error)
            self.exit_code = 1
            return True
        if isinstance(self.engine.error, WorkerDiedError):
            now = time.monotonic()
            if self._worker_lost_at is None:
                self._worker_lost_at = now
                self.exit_code = 1
                logger.error(
                    "the engine lost a worker (%s); exiting in %.0f s",
                    self.engine.error,
                    WORKER_LOST_EXIT_DELAY_S,
                )
            if now - self._worker_lost_at >= WORKER_LOST_EXIT_DELAY_S:
                self.should_exit = True
        if self.engine.is_ready and not self._announced_ready:
            self._announced_ready = True
            logger.info("serving %s on %s", self.served_model_name, self.url)
        if self._drain_deadline is not None and not self.should_exit:
            if self.state.num_inflight == 0:
                logger.info("drained: no request in flight")
                self.should_exit = True
            elif time.monotonic() >= self._drain_deadline:
                logger.warning(
                    "shutdown timeout: aborting %d in-flight request(s)", self.state.num_inflight
                )
                self.engine.abort_all(SHUTDOWN_ABORT_REASON)
                self.should_exit = True
            elif counter % 10 == 0:
                logger.info("draining: %d request(s) in flight", self.state.num_inflight)
        return await super().on_tick(counter)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before the model loads, so the port is taken (or the error shown) at once and
    /health can answer 503 while loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
