"""StructuredOutputManager: the engine's one grammar backend, its compile cache, and each
constrained request's matcher. It lives in the engine process beside the scheduler: the
scheduler asks it for the masks of the step's constrained rows (sent to the model runner with
the step, applied to those rows' logits only) and feeds it the tokens each request accepts.

Drafts (speculative decoding) stay exact under a grammar: a request's drafts are cut to their
longest prefix the grammar allows, and the step carries one mask per position (the state after
the newest token and the first t drafts), so every token the runner samples is one the grammar
allows after the tokens before it, as in plain decoding."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from pagedllm.engine.structured_output.backend import GrammarMatcher, StructuredOutputBackend
from pagedllm.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from pagedllm.engine.request import Request

logger = logging.getLogger(__name__)

BACKENDS = ("xgrammar",)
CACHE_SIZE = 256  # compiled grammars kept (LRU)


class StructuredOutputManager:
    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: list[int],
        backend: str = "xgrammar",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"structured outputs backend must be one of {BACKENDS}")
        self.backend_name = backend
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._backend: StructuredOutputBackend | None = None
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        # NOTE: compile() is called from the server's worker threads and the engine's thread.
        self._lock = threading.Lock()

    @property
    def backend(self) -> StructuredOutputBackend:
        """Built on first use: reading the vocabulary into the grammar engine takes ~1 s."""
        with self._lock:
            if self._backend is None:
                from pagedllm.engine.structured_output.xgrammar_backend import XgrammarBackend

                self._backend = XgrammarBackend(
                    self._tokenizer, self._vocab_size, self._stop_token_ids
                )
            return self._backend

    def compile(self, params: StructuredOutputsParams) -> Any:
        """Thread-safe and cached by the params' key; ValueError for a bad grammar."""
        key = params.key()
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = self.backend.compile(params)  # outside the lock: compiles run in parallel
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def new_matcher(self, params: StructuredOutputsParams) -> GrammarMatcher:
        return self.backend.new_matcher(self.compile(params))

    # ---- per step ------------------------------------------------------------------------------
    def bitmask(self, request: Request, drafts: list[int]) -> np.ndarray | None:
        """[1 + len(drafts), words]: the tokens allowed after the newest token and after each
        prefix of the drafts (which the grammar must allow: see valid_drafts)."""
        matcher = request.grammar
        if matcher is None or matcher.is_terminated():
            return None
        mask = self.backend.allocate_bitmask(1 + len(drafts))
        matcher.fill_bitmask(mask, 0)
        accepted = 0
        for row, token in enumerate(drafts, start=1):
            if not matcher.accept_token(token):
                break
            accepted += 1
            if matcher.is_terminated():
                break
            matcher.fill_bitmask(mask, row)
        matcher.rollback(accepted)
        assert accepted == len(drafts), "drafts must be cut to the grammar first"
        return mask

    def valid_drafts(self, request: Request, drafts: list[int]) -> list[int]:
        """The longest prefix of ``drafts`` the grammar allows after the request's tokens."""
        matcher = request.grammar
        if matcher is None or not drafts:
            return drafts
        accepted = 0
        for token in drafts:
            if matcher.is_terminated() or not matcher.accept_token(token):
                break
            accepted += 1
        matcher.rollback(accepted)
        return drafts[:accepted]

    @staticmethod
    def accept(request: Request, token_id: int) -> None:
        """Advance the request's matcher by a token it generated."""
        matcher = request.grammar
        if matcher is None or matcher.is_terminated():
            return
        if not matcher.accept_token(token_id):
            # Only possible if the mask was not applied to the token's row: a bug, not input.
            logger.error(
                "request %s generated token %d, which its grammar does not allow",
                request.req_id,
                token_id,
            )
