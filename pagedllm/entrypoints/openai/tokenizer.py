"""AsyncTokenizer: the server's tokenizer work (encode, decode, chat template) on one helper
thread, so a huge prompt never stalls the event loop (and /health) while it is tokenized.

It uses the engine's private front-end copy of the tokenizer; one thread means that copy is never
used concurrently.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.llm import apply_chat_template

T = TypeVar("T")


class AsyncTokenizer:
    def __init__(self, engine: AsyncLLM, chat_template: str | None = None) -> None:
        self.engine = engine
        self.chat_template = chat_template
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedllm-tokenizer")

    @property
    def tokenizer(self) -> Any:
        return self.engine.info.tokenizer

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tok = self.tokenizer

        def encode() -> list[int]:
            try:
                return list(tok.encode(text, add_special_tokens=add_special_tokens))
            except Exception as exc:  # e.g. a lone UTF-16 surrogate ("\ud800") in the JSON
                raise ValueError(f"the prompt cannot be tokenized: {exc}") from exc

        return await self._run(encode)

    async def decode(self, token_ids: list[int]) -> str:
        vocab_size = self.engine.info.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")
        tok = self.tokenizer
        return await self._run(lambda: tok.decode(token_ids))

    async def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        tok = self.tokenizer
        return await self._run(lambda: [str(t) for t in tok.convert_ids_to_tokens(token_ids)])

    async def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> tuple[str, list[int]]:
        """-> (prompt text, token ids); ValueError for malformed messages or a broken template."""
        tok = self.tokenizer

        def render() -> tuple[str, list[int]]:
            try:
                return apply_chat_template(tok, messages, self.chat_template, add_generation_prompt)
            except ValueError:
                raise
            except Exception as exc:  # jinja raises its own errors (e.g. raise_exception())
                raise ValueError(f"the chat template failed on these messages: {exc}") from exc

        return await self._run(render)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
