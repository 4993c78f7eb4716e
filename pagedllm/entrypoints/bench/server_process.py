"""A server under test, started in a subprocess: wait until /health answers 200, stop it with
SIGTERM afterwards (SIGKILL only if it will not go).

The command is any argv, so the sweep can drive ``pagedllm serve``, ``vllm serve`` or
``llama-server`` alike; its output goes to a log file kept next to the results.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from types import TracebackType

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``with ServerProcess(argv, base_url, log_path) as server:`` -> a healthy server."""

    def __init__(
        self,
        argv: list[str],
        base_url: str,
        log_path: str,
        startup_timeout_s: float = 600.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.argv = argv
        self.base_url = base_url.rstrip("/")
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        start = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy(start)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - start

    def _wait_healthy(self, start: float) -> None:
        assert self.proc is not None
        url = self.base_url + "/health"
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise RuntimeError(
                        f"the server exited with code {code} before it was healthy; "
                        f"see {self.log_path}"
                    )
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.perf_counter() - start > self.startup_timeout_s:
                    raise RuntimeError(
                        f"{url} not healthy after {self.startup_timeout_s:.0f} s; "
                        f"see {self.log_path}"
                    )
                time.sleep(0.5)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
