"""AsyncTokenizer: a prompt too long to fit is refused before any tokenizing, and a huge prompt
being tokenized does not hold up a short one (separate lanes)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.tokenizer import LARGE_TEXT_CHARS, AsyncTokenizer


class StubTokenizer:
    """One id per character; encoding a large text blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[int] = []

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "bb": 1, "longest": 2}  # longest entry: 7 characters

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append(len(text))
        if len(text) > LARGE_TEXT_CHARS:
            assert self.release.wait(30)
        return [0] * len(text)

    def __deepcopy__(self, memo: dict) -> StubTokenizer:
        return self  # the stub is thread-safe; the real one is copied for the bulk lane


def make(max_model_len: int = 10_000) -> tuple[AsyncTokenizer, StubTokenizer]:
    stub = StubTokenizer()
    engine = SimpleNamespace(info=SimpleNamespace(tokenizer=stub, max_model_len=max_model_len))
    return AsyncTokenizer(engine), stub  # type: ignore[arg-type]


def test_limit_is_max_model_len_times_the_longest_token():
    tokenizer, _ = make(max_model_len=100)
    assert tokenizer.max_prompt_chars == 700


def test_too_long_prompt_is_refused_without_tokenizing():
    tokenizer, stub = make(max_model_len=100)

    async def go() -> None:
        assert len(await tokenizer.encode("a" * 700)) == 700
        with pytest.raises(OpenAIError) as info:
            await tokenizer.encode("a" * 701)
        assert info.value.code == "context_length_exceeded"
        with pytest.raises(OpenAIError):
            await tokenizer.apply_chat_template([{"role": "user", "content": "a" * 701}])

    try:
        asyncio.run(go())
    finally:
        tokenizer.shutdown()
    assert stub.calls == [700]


def test_huge_prompt_does_not_block_a_short_one():
    tokenizer, stub = make()

    async def go() -> None:
        huge = asyncio.ensure_future(tokenizer.encode("a" * (LARGE_TEXT_CHARS + 1)))
        await asyncio.sleep(0.05)
        # The huge one is stuck in the bulk lane; the short one still comes back.
        assert await asyncio.wait_for(tokenizer.encode("hello"), timeout=10) == [0] * 5
        assert not huge.done()
        stub.release.set()
        assert len(await huge) == LARGE_TEXT_CHARS + 1

    try:
        asyncio.run(go())
    finally:
        stub.release.set()
        tokenizer.shutdown()
