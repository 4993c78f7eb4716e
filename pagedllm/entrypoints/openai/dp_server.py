"""``pagedllm serve --data-parallel-size N``: N engine replicas behind this one front end.

Each replica is an ordinary ``pagedllm serve`` process (same flags, its own engine and KV
cache, listening on loopback on a free port, pinned to its share of the cores). The front end
is an HTTP proxy: it routes each completion, chat or embeddings request with
DataParallelRouter (the replica that cached the prompt's prefix, else the least-loaded),
relays the answer byte for byte (streams included), sends LoRA adapter loads and unloads to
every replica, answers /health for all replicas and merges their /metrics under a ``replica``
label. A replica that exits makes /health fail and the front end exit 1 after
REPLICA_LOST_EXIT_DELAY_S, as a lost tensor-parallel worker does."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

from pagedllm import envs
from pagedllm.entrypoints.openai.cli_args import ServerConfig
from pagedllm.entrypoints.openai.dp_router import DataParallelRouter, prompt_text
from pagedllm.entrypoints.openai.errors import error_response
from pagedllm.entrypoints.openai.launcher import (
    WORKER_LOST_EXIT_DELAY_S as REPLICA_LOST_EXIT_DELAY_S,
)
from pagedllm.entrypoints.openai.launcher import bind_socket, socket_url
from pagedllm.entrypoints.openai.middleware import BodySizeLimit
from pagedllm.executor.multiproc import die_with_parent

logger = logging.getLogger(__name__)

_URL_RE = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
# Flags the front end keeps for itself; each replica listens on loopback, port 0.
_FRONT_END_FLAGS = ("--data-parallel-size", "--host", "--port")
_FORWARDED_HEADERS = ("content-type", "authorization", "accept")
_RELAYED_HEADERS = ("content-type", "cache-control", "x-request-id")


@dataclass
class Replica:
    index: int
    proc: subprocess.Popen
    url: str | None = None
    cores: tuple[int, ...] = ()


@dataclass
class ReplicaSet:
    """The replica processes, started with the front end's flags (less its own)."""

    argv: list[str]
    size: int
    replicas: list[Replica] = field(default_factory=list)
    ready: bool = False
    failure: str | None = None
    stopping: bool = False

    def start(self) -> None:
        cores = sorted(os.sched_getaffinity(0))
        per = len(cores) // self.size
        for i in range(self.size):
            mine = tuple(cores[i * per : (i + 1) * per]) if per else ()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if mine:
                env["OMP_NUM_THREADS"] = str(len(mine))
            proc = subprocess.Popen(
                [sys.executable, "-m", "pagedllm.entrypoints.openai.api_server", *self.argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                preexec_fn=lambda m=mine: _replica_setup(m),
            )
            replica = Replica(i, proc, cores=mine)
            self.replicas.append(replica)
            threading.Thread(target=self._relay_log, args=(replica,), daemon=True).start()
        logger.info(
            "data parallel: %d replicas (pids %s, cores %s)",
            self.size,
            [r.proc.pid for r in self.replicas],
            [list(r.cores) for r in self.replicas],
        )

    def _relay_log(self, replica: Replica) -> None:
        assert replica.proc.stdout is not None
        for line in replica.proc.stdout:
            if replica.url is None and (m := _URL_RE.search(line)):
                replica.url = m.group(1)
            sys.stderr.write(f"[replica {replica.index}] {line}")

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.replicas)
        while pending:
            self.check_alive()
            if time.monotonic() > deadline:
                self.failure = f"replicas {[r.index for r in pending]} did not load in time"
                return
            for replica in list(pending):
                if replica.url is None:
                    continue
                try:
                    resp = await client.get(replica.url + "/health", timeout=5)
                except httpx.TransportError:
                    continue
                if resp.status_code == 200:
                    pending.remove(replica)
            await asyncio.sleep(0.1)
        self.ready = True
        logger.info("data parallel: all %d replicas ready", self.size)

    def check_alive(self) -> None:
        if self.failure is not None or self.stopping:
            return
        for replica in self.replicas:
            code = replica.proc.poll()
            if code is not None:
                self.failure = (
                    f"replica {replica.index} (pid {replica.proc.pid}) exited with {code}"
                )
                logger.error("data parallel: %s", self.failure)
                return

    def stop(self, timeout: float) -> None:
        self.stopping = True
        for replica in self.replicas:
            if replica.proc.poll() is None:
                replica.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for replica in self.replicas:
            try:
                replica.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                replica.proc.kill()
                replica.proc.wait()


def _replica_setup(cores: tuple[int, ...]) -> None:
    """In the replica, before exec: its share of the cores, and death with the front end (a
    front end killed with SIGKILL left its replicas running, holding their ports)."""
    if cores:
        os.sched_setaffinity(0, cores)
    die_with_parent()


def replica_argv(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name, eq, _ = arg.partition("=")
        if name in _FRONT_END_FLAGS:
            skip = not eq
            continue
        out.append(arg)
    return [*out, "--host", "127.0.0.1", "--port", "0"]


def relabel_metrics(text: str, replica: int, seen_meta: set[str]) -> list[str]:
    """A replica's Prometheus text with ``replica="i"`` on every sample; each HELP/TYPE line
    kept once across replicas."""
    out = []
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            if line not in seen_meta:
                seen_meta.add(line)
                out.append(line)
            continue
        name, brace, rest = line.partition("{")
        if brace:
            out.append(f'{name}{{replica="{replica}",{rest}')
        else:
            metric, _, value = line.partition(" ")
            out.append(f'{metric}{{replica="{replica}"}} {value}')
    return out


def build_dp_app(config: ServerConfig, replicas: ReplicaSet) -> FastAPI:
    router = DataParallelRouter(replicas.size)
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10))
        state["client"] = client
        replicas.start()
        ready = asyncio.create_task(replicas.wait_ready(client, envs.worker_start_timeout()))
        try:
            yield
        finally:
            ready.cancel()
            await asyncio.to_thread(replicas.stop, config.shutdown_timeout + 10)
            await client.aclose()

    app = FastAPI(title="pagedllm data-parallel front end", lifespan=lifespan)

    def unavailable() -> Response | None:
        replicas.check_alive()
        if replicas.failure is not None:
            return error_response(
                f"the server lost an engine replica: {replicas.failure}", 500, code="engine_dead"
            )
        if not replicas.ready:
            return error_response("the model is still loading", 503, code="model_loading")
        return None

    async def forward(request: Request, index: int, path: str, routed: bool) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        client = state["client"]
        url = replicas.replicas[index].url + path
        try:
            upstream = await client.send(
                client.build_request(
                    request.method,
                    url,
                    content=body,
                    headers=headers,
                    params=request.query_params,
                ),
                stream=True,
            )
        except httpx.TransportError as exc:
            if routed:
                router.done(index)
            return error_response(
                f"engine replica {index} is unreachable: {exc}", 503, code="replica_unavailable"
            )

        async def relay():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()
                if routed:
                    router.done(index)

        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() in _RELAYED_HEADERS}
        return StreamingResponse(relay(), status_code=upstream.status_code, headers=out_headers)

    async def generate(request: Request) -> Response:
        if (problem := unavailable()) is not None:
            return problem
        body = await request.body()
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            parsed = {}  # the replica answers the 400
        text = prompt_text(parsed) if isinstance(parsed, dict) else ""
        index = router.route(text)
        return await forward(request, index, request.url.path, routed=True)

    async def every_replica(request: Request) -> Response:
        """A change every replica must make (a LoRA adapter loaded or unloaded): sent to each
        in turn; the first refusal is the answer (a name is checked alike everywhere, so a
        refusal comes from the first replica, before any has changed)."""
        if (problem := unavailable()) is not None:
            return problem
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        answer = None
        for replica in replicas.replicas:
            try:
                answer = await state["client"].post(
                    replica.url + request.url.path, content=body, headers=headers, timeout=300
                )
            except httpx.TransportError as exc:
                return error_response(
                    f"an engine replica is unreachable: {exc}", 503, code="replica_unavailable"
                )
            if answer.status_code != 200:
                break
        assert answer is not None
        return Response(answer.content, answer.status_code, media_type="application/json")

    async def first_replica(request: Request) -> Response:
        if (problem := unavailable()) is not None:
            return problem
        return await forward(request, 0, request.url.path, routed=False)

    async def every_replica_answers(path: str) -> Response:
        """200 when every replica answers ``path`` (a probe) with 200, else the first
        failure's status."""
        client = state["client"]
        answers = await asyncio.gather(
            *(client.get(r.url + path, timeout=5) for r in replicas.replicas),
            return_exceptions=True,
        )
        for i, answer in enumerate(answers):
            if isinstance(answer, BaseException) or answer.status_code != 200:
                status = 503 if isinstance(answer, BaseException) else answer.status_code
                return error_response(
                    f"engine replica {i} answered {path} with {status}",
                    status,
                    code="replica_unhealthy",
                )
        return Response(status_code=200)

    async def health(request: Request) -> Response:
        if (problem := unavailable()) is not None:
            return problem
        return await every_replica_answers("/health")

    async def live(request: Request) -> Response:
        """The front end answers; each replica's engine loop is alive (a replica still loading
        is alive: the startup probe waits for /ready)."""
        replicas.check_alive()
        if replicas.failure is not None:
            return error_response(
                f"the server lost an engine replica: {replicas.failure}", 500, code="engine_dead"
            )
        if not replicas.ready:
            return Response(status_code=200)
        return await every_replica_answers("/live")

    async def ready(request: Request) -> Response:
        """Every replica ready (loaded, warmed up, not draining: a draining replica's 503
        passes through)."""
        if not replicas.ready or replicas.failure is not None:
            return error_response("the engine replicas are not ready", 503, code="model_loading")
        return await every_replica_answers("/ready")

    async def metrics(request: Request) -> Response:
        if not replicas.ready:
            return error_response("the model is still loading", 503, code="model_loading")
        client = state["client"]
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        answers = await asyncio.gather(
            *(
                client.get(r.url + "/metrics", headers=headers, timeout=10)
                for r in replicas.replicas
            ),
            return_exceptions=True,
        )
        lines: list[str] = []
        seen: set[str] = set()
        for i, answer in enumerate(answers):
            if isinstance(answer, BaseException):
                continue  # a replica gone: /health says so
            if answer.status_code != 200:
                return Response(answer.content, answer.status_code, media_type="application/json")
            lines += relabel_metrics(answer.text, i, seen)
        lines += router_metrics(router)
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    routed = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/pooling", "/score")
    for path in (*routed, "/v1/score"):
        app.add_api_route(path, generate, methods=["POST"])
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        app.add_api_route(path, every_replica, methods=["POST"])
    for path in ("/tokenize", "/detokenize"):
        app.add_api_route(path, first_replica, methods=["POST"])
    for path in ("/v1/models", "/v1/models/{model_id:path}", "/version"):
        app.add_api_route(path, first_replica, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/live", live, methods=["GET"])
    app.add_api_route("/ready", ready, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_bytes)
    app.state.router = router
    app.state.replicas = replicas
    return app


def router_metrics(router: DataParallelRouter) -> list[str]:
    series = (
        (
            "dp_requests_routed",
            "counter",
            "Requests the front end sent to each replica.",
            router.routed,
        ),
        (
            "dp_requests_prefix_routed",
            "counter",
            "Requests sent to a replica because it had served their prompt's prefix.",
            router.prefix_routed,
        ),
        ("dp_requests_in_flight", "gauge", "Requests in flight at each replica.", router.in_flight),
    )
    lines = []
    for name, kind, help_text, values in series:
        full = f"pagedllm:{name}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP pagedllm:{name} {help_text}", f"# TYPE pagedllm:{name} {kind}"]
        lines += [f'{full}{{replica="{i}"}} {v}' for i, v in enumerate(values)]
    return lines


class DataParallelServer(uvicorn.Server):
    """Exits 1 once a replica is lost (after the delay /health needs to be seen failing)."""

    def __init__(self, config: uvicorn.Config, replicas: ReplicaSet) -> None:
        super().__init__(config)
        self.replicas = replicas
        self.exit_code = 0
        self._lost_at: float | None = None

    async def on_tick(self, counter: int) -> bool:
        self.replicas.check_alive()
        if self.replicas.failure is not None and not self.replicas.stopping:
            now = time.monotonic()
            if self._lost_at is None:
                self._lost_at = now
                self.exit_code = 1
            if now - self._lost_at >= REPLICA_LOST_EXIT_DELAY_S:
                self.should_exit = True
        return await super().on_tick(counter)


def serve_data_parallel(config: ServerConfig, argv: list[str]) -> int:
    replicas = ReplicaSet(replica_argv(argv), config.data_parallel_size)
    app = build_dp_app(config, replicas)
    sock = bind_socket(config.host, config.port)
    server = DataParallelServer(
        uvicorn.Config(
            app,
            log_level=config.uvicorn_log_level,
            access_log=config.access_log,
            timeout_graceful_shutdown=int(config.shutdown_timeout),
            lifespan="on",
        ),
        replicas,
    )
    logger.info("listening on %s; starting %d engine replicas", socket_url(sock), replicas.size)
    server.run(sockets=[sock])
    return server.exit_code
