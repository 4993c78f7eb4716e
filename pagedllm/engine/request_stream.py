"""RequestStream: the outputs of one request as the event loop sees them.

A producer (the AsyncLLM worker, via ``loop.call_soon_threadsafe``) puts the request's
acceptance, its cumulative outputs, or an error; a consumer iterates with ``async for``. Outputs
are cumulative, so only the newest is kept: a slow consumer skips intermediate outputs but never
loses text or tokens. The consumer's ``abort()``, or its cancellation while waiting, aborts the
request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pagedllm.outputs import RequestOutput


class RequestStream:
    """The outputs of one request, as seen from the event loop. Iterate it with ``async for``;
    ``abort()`` (idempotent) cancels the request if it has not finished."""

    def __init__(
        self,
        request_id: str,
        abort_fn: Callable[[str], None],
        on_start: Callable[[str], None] | None = None,
    ) -> None:
        """``on_start(request_id)``: called once, at the first output, error or abort."""
        self.request_id = request_id
        self._abort_fn = abort_fn
        self._on_start = on_start
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._event = asyncio.Event()
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._done = False  # the consumer has seen the final output or an error

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._started()
            self._abort_fn(self.request_id)

    def _started(self) -> None:
        if self._on_start is not None:
            on_start, self._on_start = self._on_start, None
            on_start(self.request_id)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            await self._event.wait()
        except BaseException:
            self.abort()  # the consumer was cancelled (e.g. the client disconnected)
            raise
        self._event.clear()
        if self._error is not None:
            self._done = True
            raise self._error
        out = self._latest
        assert out is not None
        if out.finished:
            self._done = True
        return out

    # ---- the producer's side, called on the event loop --------------------------------------
    def put_accepted(self, error: BaseException | None) -> None:
        if self.accepted.done():
            return
        if error is not None:
            self._started()
        if error is None:
            self.accepted.set_result(None)
        else:
            self._done = True
            self.accepted.set_exception(error)

    def put(self, out: RequestOutput) -> None:
        self._started()
        self._latest = out
        self._event.set()

    def put_error(self, error: BaseException) -> None:
        self._started()
        self.put_accepted(error)
        self._error = error
        self._event.set()
