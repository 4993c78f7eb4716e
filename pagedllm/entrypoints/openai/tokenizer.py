"""AsyncTokenizer: the server's tokenizer work (encode, decode, chat template) off the event
loop, so a huge prompt never stalls it (and /health) while it is tokenized.

Two lanes, one thread and one tokenizer copy each (so no copy is used concurrently): texts up to
``LARGE_TEXT_CHARS`` go to the fast lane, longer ones to the bulk lane, so a megabyte prompt
cannot hold up a short chat behind it. A text too long to fit the context whatever it tokenizes
to (more characters than ``max_model_len`` times the longest token) is refused before any work,
and the memory a large job took is handed back to the OS after it.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any, TypeVar

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.chat_templates import ToolTemplateError
from pagedllm.entrypoints.llm import apply_chat_template
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.model_executor.malloc_tuning import release_free_memory

T = TypeVar("T")

# Texts (and token lists) longer than this are tokenized on the bulk lane.
LARGE_TEXT_CHARS = 32 * 1024


class AsyncTokenizer:
    def __init__(self, engine: AsyncLLM, chat_template: str | None = None) -> None:
        self.engine = engine
        self.chat_template = chat_template
        self._fast = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedllm-tokenizer")
        self._bulk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedllm-tokenizer-bulk")
        self._bulk_tokenizer: Any = None  # the bulk lane's own copy, made on first use

    @property
    def tokenizer(self) -> Any:
        return self.engine.info.tokenizer

    @cached_property
    def max_prompt_chars(self) -> int:
        """No prompt longer than this fits: a token covers at most its own string's length in
        characters (byte-level BPE: one character per byte; SentencePiece: its pieces)."""
        longest = max(len(t) for t in self.tokenizer.get_vocab())
        return self.engine.info.max_model_len * max(longest, 1)

    def check_length(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_prompt_chars:
            max_model_len = self.engine.info.max_model_len
            raise OpenAIError(
                f"the prompt is {num_chars} characters long, more than this model's maximum "
                f"context length of {max_model_len} tokens could ever hold "
                f"({self.max_prompt_chars} characters); shorten the prompt",
                param=param,
                code="context_length_exceeded",
            )

    def _lane_tokenizer(self, large: bool) -> Any:
        if not large:
            return self.tokenizer
        if self._bulk_tokenizer is None:
            self._bulk_tokenizer = copy.deepcopy(self.tokenizer)
        return self._bulk_tokenizer

    async def _run(self, size: int, fn: Callable[[Any], T]) -> T:
        """Run ``fn(tokenizer)`` on the lane for a job of ``size`` characters or tokens."""
        large = size > LARGE_TEXT_CHARS

        def job() -> T:
            try:
                return fn(self._lane_tokenizer(large))
            finally:
                if large:
                    release_free_memory()

        executor = self._bulk if large else self._fast
        return await asyncio.get_running_loop().run_in_executor(executor, job)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.check_length(len(text), "prompt")

        def encode(tok: Any) -> list[int]:
            try:
                return list(tok.encode(text, add_special_tokens=add_special_tokens))
            except Exception as exc:  # e.g. a lone UTF-16 surrogate ("\ud800") in the JSON
                raise ValueError(f"the prompt cannot be tokenized: {exc}") from exc

        return await self._run(len(text), encode)

    async def decode(self, token_ids: list[int]) -> str:
        vocab_size = self.engine.info.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")
        return await self._run(len(token_ids), lambda tok: tok.decode(token_ids))

    async def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return await self._run(
            len(token_ids), lambda tok: [str(t) for t in tok.convert_ids_to_tokens(token_ids)]
        )

    async def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[str, list[int]]:
        """-> (prompt text, token ids); ValueError for malformed messages or a broken template."""
        num_chars = sum(len(str(m.get("content") or "")) for m in messages)
        num_chars += len(json.dumps(tools)) if tools else 0
        self.check_length(num_chars, "messages")

        def render(tok: Any) -> tuple[str, list[int]]:
            try:
                return apply_chat_template(
                    tok, messages, self.chat_template, add_generation_prompt, tools
                )
            except ToolTemplateError as exc:
                raise OpenAIError(str(exc), param="tools" if tools else "messages") from exc
            except ValueError:
                raise
            except Exception as exc:  # jinja raises its own errors (e.g. raise_exception())
                raise ValueError(f"the chat template failed on these messages: {exc}") from exc

        return await self._run(num_chars, render)

    @property
    def template(self) -> str | None:
        """The chat template in use: ``--chat-template`` or the model's."""
        return self.chat_template or getattr(self.tokenizer, "chat_template", None)

    def shutdown(self) -> None:
        for executor in (self._fast, self._bulk):
            executor.shutdown(wait=False, cancel_futures=True)
