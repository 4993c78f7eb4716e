"""AsyncLLM: the LLMEngine driven by one background thread, with an asyncio front.

LLMEngine is not thread-safe, so exactly one worker thread builds it and calls every one of its
methods. The asyncio side never touches the engine: it puts commands (add, abort, stop) on a
thread-safe queue that the worker applies between steps, and the worker hands outputs back with
``loop.call_soon_threadsafe``. A forward pass therefore never blocks the event loop.

    event loop (HTTP)                       worker thread (owns LLMEngine)
    add_request() --_Add-->  queue  ------> apply commands, step(), stats
    RequestStream  <-- call_soon_threadsafe -- cumulative RequestOutputs / errors

Each request's outputs reach its consumer through a ``RequestStream`` (request_stream.py).
"""

from __future__ import annotations

import asyncio
import copy
import enum
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pagedllm.config import EngineArgs
from pagedllm.engine.admission import AdmissionControl, QueueFullError, default_max_waiting
from pagedllm.engine.llm_engine import LLMEngine, PromptType
from pagedllm.engine.request_stream import RequestStream
from pagedllm.engine.scheduler import SchedulerStats
from pagedllm.engine.stats import IterationStats, RequestStatsTracker, StatLogger
from pagedllm.executor import WorkerDiedError
from pagedllm.lora import LoRARequest
from pagedllm.outputs import EmbeddingRequestOutput, RequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)

WARMUP_REQUEST_ID = "__pagedllm_warmup__"


class EngineDeadError(RuntimeError):
    """The engine failed (while loading or in a step); it serves no more requests."""


class EngineNotReadyError(RuntimeError):
    """The engine is still loading the model."""


class RequestAbortedError(RuntimeError):
    """The request was cut off unfinished by a shutdown (not by its own client)."""


# Steps failing in a row before the engine counts as dead (/health 500, every request failed).
MAX_CONSECUTIVE_STEP_FAILURES = 3


class StepFailedError(RuntimeError):
    """An engine step this request was part of raised; the request was aborted (its blocks
    freed) and the engine kept serving the others."""


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class EngineInfo:
    """What the front end may read about the loaded engine without touching it."""

    model: str
    max_model_len: int
    vocab_size: int
    # NOTE: a private copy of the engine's tokenizer, so the front end never shares the (not
    # thread-safe) tokenizer object the worker thread decodes with.
    tokenizer: Any
    runner_type: str = "generate"  # or "pooling": which API routes it serves
    hidden_size: int = 0


@dataclass
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams | PoolingParams
    arrival_time: float
    stream: RequestStream
    group_id: str | None = None
    lora_request: LoRARequest | None = None


@dataclass
class _Call:
    """Run ``fn(engine)`` on the engine thread between steps; its result (or exception) goes
    to ``done`` on the event loop."""

    fn: Callable[[LLMEngine], Any]
    done: Callable[[Any, BaseException | None], None]


@dataclass
class _Abort:
    request_ids: list[str] = field(default_factory=list)
    all: bool = False
    reason: str | None = None  # given: the streams get a RequestAbortedError, not an output


@dataclass
class _Stop:
    pass


@dataclass
class _WorkerLost:
    reason: str


_Command = _Add | _Abort | _Stop | _WorkerLost | _Call


class AsyncLLM:
    """``start()`` from a running event loop; then ``generate()`` / ``add_request()``."""

    def __init__(
        self,
        args: EngineArgs,
        stat_loggers: Sequence[StatLogger] = (),
        engine_factory: Callable[[EngineArgs], LLMEngine] = LLMEngine,
        max_waiting_requests: int | None = None,
    ) -> None:
        """``max_waiting_requests``: sequences that may wait for their first token before
        add_request raises QueueFullError (None: admission.default_max_waiting)."""
        self.args = args
        self._max_waiting_requests = max_waiting_requests
        self.admission: AdmissionControl | None = None  # made once the engine is loaded
        self.stat_loggers = list(stat_loggers)
        self._engine_factory = engine_factory
        self._queue: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self.state = EngineState.LOADING
        self.error: BaseException | None = None
        self._info: EngineInfo | None = None
        self._structured_output: Any = None  # the engine's StructuredOutputManager
        # Latest scheduler snapshot; replaced (never mutated) by the worker.
        self.stats: SchedulerStats | None = None
        # NOTE: worker-thread only: the streams of requests the engine is running.
        self._streams: dict[str, RequestStream] = {}
        self._step_failures = 0  # consecutive failed steps (worker thread only)
        # When the step now running began (time.monotonic), None between steps; written by
        # the worker, read by /live.
        self._step_started: float | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncLLM already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()

    def wait_until_ready(self, timeout: float | None = None) -> bool:
        """Block (not from the event loop) until the engine is loaded or has failed."""
        return self._ready.wait(timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is still running and stop the worker (blocks up to ``timeout``)."""
        if self._thread is None:
            return
        self._queue.put(_Stop())
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("engine thread did not stop within %.1f s", timeout)

    def step_running_for(self) -> float:
        """Seconds the engine step now running has taken (0 between steps, when the loop
        waits for work: an idle engine is not a stuck one)."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    @property
    def is_ready(self) -> bool:
        return self.state == EngineState.READY

    @property
    def failed_to_load(self) -> bool:
        return self.state == EngineState.FAILED and self._info is None

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            if self.state == EngineState.FAILED:
                raise EngineDeadError(f"engine failed to load: {self.error}")
            raise EngineNotReadyError("the model is still loading")
        return self._info

    # ---- requests ------------------------------------------------------------------------------
    async def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | PoolingParams,
        arrival_time: float | None = None,
        group_id: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> RequestStream:
        """Queue a request and wait until the engine accepted it. Raises ValueError for bad input
        (nothing is queued then), EngineNotReadyError / EngineDeadError if it cannot serve.
        Requests sharing a ``group_id`` (one API call's prompts) share their fair turn."""
        self._check_alive()
        assert self.admission is not None
        try:
            self.admission.admit(request_id, getattr(params, "n", 1))
        except QueueFullError:
            self.record_rejection("queue_full")
            raise
        stream = RequestStream(request_id, self.abort, on_start=self.admission.started)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self._queue.put(_Add(request_id, prompt, params, arrival, stream, group_id, lora_request))
        try:
            await stream.accepted
        except BaseException:
            stream.abort()  # no-op if it was rejected; aborts it if we were cancelled meanwhile
            raise
        return stream

    async def call_engine(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between two steps (e.g. load or unload a
        LoRA adapter) and return its result; its exception is raised here."""
        self._check_alive()
        assert self._loop is not None
        future = self._loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self._queue.put(_Call(fn, done))
        return await future

    async def compile_structured_output(self, params: StructuredOutputsParams) -> None:
        """Compile a request's grammar on a worker thread and cache it, so that add_request
        finds it compiled and a slow compile never stalls the engine's steps. Raises
        ValueError for a bad schema, regex or grammar."""
        self._check_alive()
        await asyncio.to_thread(self._structured_output.compile, params)

    async def generate(
        self, prompt: PromptType, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """vLLM's ``AsyncLLM.generate``: cumulative outputs until the request finishes. Closing
        the iterator early (or cancelling its consumer) aborts the request."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    async def encode(
        self, prompt: PromptType, params: PoolingParams, request_id: str
    ) -> EmbeddingRequestOutput:
        """vLLM's ``AsyncLLM.encode`` for a pooling engine: the prompt's embedding. Cancelling
        the caller aborts the request."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                if out.finished:
                    return out
            raise RuntimeError(f"request {request_id} ended without an output")
        finally:
            stream.abort()

    def record_rejection(self, reason: str) -> None:
        """Count a request turned away (``queue_full``, ``timeout``) in the stat loggers."""
        for stat_logger in self.stat_loggers:
            record = getattr(stat_logger, "record_rejection", None)
            if record is not None:
                record(reason)

    def abort(self, request_id: str | list[str]) -> None:
        """Thread-safe and non-blocking; the worker frees the KV blocks before its next step."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self._queue.put(_Abort(ids))

    def abort_all(self, reason: str | None = None) -> None:
        """Abort every request; with a reason (a shutdown), their consumers get a
        RequestAbortedError carrying it instead of a final output with finish_reason abort."""
        self._queue.put(_Abort(all=True, reason=reason))

    def _check_alive(self) -> None:
        if self.state == EngineState.READY:
            return
        if self.state == EngineState.LOADING:
            raise EngineNotReadyError("the model is still loading")
        raise EngineDeadError(f"the engine is not running ({self.state.value}): {self.error}")

    # ---- the worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        engine = None
        try:
            engine = self._engine_factory(self.args)
            _warm_up(engine)
            self._structured_output = engine.structured_output
            kv = engine.kv_cache_manager
            self.admission = AdmissionControl(
                self._max_waiting_requests
                or default_max_waiting(
                    engine.scheduler_config.max_num_seqs,
                    kv.num_blocks * kv.block_size // engine.max_model_len,
                )
            )
            tokenizer = _private_copy(engine.tokenizer)
            self._info = EngineInfo(
                model=engine.model_config.model,
                max_model_len=engine.max_model_len,
                vocab_size=engine.model_config.vocab_size,
                tokenizer=tokenizer,
                runner_type=engine.model_config.runner_type,
                hidden_size=engine.runner.arch.hidden_size,
            )
        except BaseException as exc:
            logger.exception("engine failed to load")
            if engine is not None:
                engine.shutdown()
            self._fail(exc)
            self._ready.set()
            self._serve_dead()
            return
        # A tensor-parallel worker that dies while the loop waits for requests fails it too.
        engine.executor.on_failure(lambda reason: self._queue.put(_WorkerLost(reason)))
        self.state = EngineState.READY
        self._ready.set()
        self._record(engine, IterationStats())
        self._loop_forever(engine)

    def _loop_forever(self, engine: LLMEngine) -> None:
        tracker = RequestStatsTracker()
        while True:
            deliveries: list[tuple[Callable[..., None], Any]] = []
            try:
                stop = self._iterate(engine, tracker, deliveries)
            except BaseException as exc:
                logger.exception("engine loop failed; failing all requests")
                self._deliver(
                    deliveries
                )  # answers adds taken this iteration (put_* are idempotent)
                self._fail(exc)
                engine.shutdown()
                self._serve_dead()
                return
            if stop:
                engine.shutdown()
                self.state = EngineState.STOPPED
                return

    def _iterate(
        self,
        engine: LLMEngine,
        tracker: RequestStatsTracker,
        deliveries: list[tuple[Callable[..., None], Any]],
    ) -> bool:
        """One iteration: apply queued commands, run one step if there is work, record stats,
        hand the outputs to their streams. -> whether a stop was requested."""
        outputs: list[RequestOutput] = []
        # Requests cut off by a shutdown: their streams get this error, not the output.
        failed: dict[str, RequestAbortedError] = {}
        stop = False
        for cmd in self._next_commands(block=not engine.has_unfinished_requests()):
            if isinstance(cmd, _Stop):
                stop = True
            elif isinstance(cmd, _WorkerLost):
                raise WorkerDiedError(cmd.reason)
            elif isinstance(cmd, _Add):
                error = self._apply_add(engine, cmd, tracker)
                deliveries.append((cmd.stream.put_accepted, error))
            elif isinstance(cmd, _Call):
                try:
                    outcome: tuple[Any, BaseException | None] = (cmd.fn(engine), None)
                except Exception as exc:
                    outcome = (None, exc)
                deliveries.append((lambda o, done=cmd.done: done(*o), outcome))
            else:
                ids = list(self._streams) if cmd.all else cmd.request_ids
                aborted = engine.abort_request(ids)
                outputs.extend(aborted)
                if cmd.reason is not None:
                    failed.update((o.request_id, RequestAbortedError(cmd.reason)) for o in aborted)
        if stop:
            aborted = engine.abort_request(list(self._streams))
            outputs.extend(aborted)
            error = RequestAbortedError("the engine stopped before this request finished")
            failed.update((o.request_id, error) for o in aborted)
        elif engine.has_unfinished_requests():
            self._step_started = time.monotonic()
            try:
                outputs.extend(engine.step())
                self._step_failures = 0
            except WorkerDiedError:
                raise
            except Exception as exc:
                # A fault in one step fails that step's requests only (their state may be
                # half updated); the engine, its blocks and the other requests go on. Steps
                # failing one after another are no passing fault: the engine is dead.
                self._step_failures += 1
                if self._step_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                    raise
                logger.exception("engine step failed; failing the requests it ran")
                error = StepFailedError(f"the engine step running this request failed: {exc}")
                aborted = engine.abort_failed_step()
                failed.update((out.request_id, error) for out in aborted)
                outputs.extend(aborted)
            finally:
                self._step_started = None
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.request_id in failed:
                deliveries.append((stream.put_error, failed[out.request_id]))
            else:
                deliveries.append((stream.put, out))
            if out.finished:
                del self._streams[out.request_id]
        # Stats first: whoever reads them after receiving an output sees the step that made it.
        self._record(engine, tracker.update(outputs, time.monotonic()))
        self._deliver(deliveries)
        return stop

    def _apply_add(
        self, engine: LLMEngine, cmd: _Add, tracker: RequestStatsTracker
    ) -> BaseException | None:
        try:
            engine.add_request(
                cmd.request_id,
                cmd.prompt,
                cmd.params,
                cmd.arrival_time,
                cmd.group_id,
                lora_request=cmd.lora_request,
            )
        except ValueError as exc:
            return exc
        except Exception as exc:  # a bug, not a user mistake: report it, keep serving
            logger.exception("add_request failed")
            return RuntimeError(f"add_request failed: {exc}")
        self._streams[cmd.request_id] = cmd.stream
        tracker.add(cmd.request_id, cmd.arrival_time)
        return None

    def _next_commands(self, block: bool) -> list[_Command]:
        cmds: list[_Command] = []
        if block:
            cmds.append(self._queue.get())
        while True:
            try:
                cmds.append(self._queue.get_nowait())
            except queue.Empty:
                return cmds

    def _serve_dead(self) -> None:
        """After a failure: reject every new request until told to stop."""
        while True:
            cmd = self._queue.get()
            if isinstance(cmd, _Stop):
                return
            if isinstance(cmd, _Add):
                self._deliver([(cmd.stream.put_error, EngineDeadError(str(self.error)))])
            elif isinstance(cmd, _Call):
                dead = EngineDeadError(str(self.error))
                self._deliver([(lambda e, done=cmd.done: done(None, e), dead)])

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self.state = EngineState.FAILED
        error = EngineDeadError(f"engine failed: {exc}")
        self._deliver([(s.put_error, error) for s in self._streams.values()])
        self._streams.clear()

    def _deliver(self, deliveries: list[tuple[Callable[..., None], Any]]) -> None:
        if not deliveries or self._loop is None:
            return

        def run() -> None:
            for callback, arg in deliveries:
                callback(arg)

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more

    def _record(self, engine: LLMEngine, iteration: IterationStats) -> None:
        stats = engine.get_stats()
        self.stats = stats
        for stat_logger in self.stat_loggers:
            try:
                stat_logger.record(stats, iteration)
            except Exception:
                logger.exception("stat logger %r failed", stat_logger)


def _warm_up(engine: LLMEngine) -> None:
    """One tiny greedy request (or embedding), so the first real request pays no one-time
    costs."""
    prompt = engine.tokenizer.encode("Hello") or [0]
    params: SamplingParams | PoolingParams = SamplingParams(
        temperature=0.0, max_tokens=2, ignore_eos=True
    )
    if engine.is_pooling:
        params = PoolingParams()
    engine.add_request(WARMUP_REQUEST_ID, prompt, params)
    while engine.has_unfinished_requests():
        engine.step()


def _private_copy(tokenizer: Any) -> Any:
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # an exotic tokenizer that cannot be copied: share it (reads are safe)
        logger.warning("could not copy the tokenizer; sharing it with the engine thread")
        return tokenizer
