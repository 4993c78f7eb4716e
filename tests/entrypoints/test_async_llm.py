"""AsyncLLM without HTTP: generate() streams cumulative outputs equal to LLM.generate, leaving a
stream early aborts the request and frees its blocks, bad input raises ValueError and changes
nothing, shutdown aborts what is in flight, and stats reach a StatLogger."""

from __future__ import annotations

import asyncio
import time

import pytest

from pagedllm.config import EngineArgs
from pagedllm.engine.async_llm import AsyncLLM, EngineState, RequestAbortedError
from pagedllm.entrypoints.llm import LLM
from pagedllm.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


class RecordingLogger:
    def __init__(self) -> None:
        self.records = []

    def record(self, scheduler_stats, iteration_stats) -> None:
        self.records.append((scheduler_stats, iteration_stats))


async def started(model_dir: str, *loggers) -> AsyncLLM:
    engine = AsyncLLM(EngineArgs(model=model_dir, kv_cache_memory=8 * 2**20), loggers)
    engine.start()
    await asyncio.to_thread(engine.wait_until_ready, 60)
    assert engine.state == EngineState.READY
    return engine


async def wait_idle(engine: AsyncLLM, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"engine not idle: {engine.stats}")


def test_generate_matches_llm_and_streams_cumulative(tiny_llama_dir):
    [expected] = LLM(tiny_llama_dir, kv_cache_memory=8 * 2**20).generate(
        "hello world", GREEDY, use_tqdm=False
    )
    logger = RecordingLogger()

    async def go():
        engine = await started(tiny_llama_dir, logger)
        try:
            outs = [out async for out in engine.generate("hello world", GREEDY, "r1")]
        finally:
            await asyncio.to_thread(engine.shutdown)
        return outs

    outs = asyncio.run(go())
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths) and lengths[-1] == 10
    assert outs[-1].outputs[0].token_ids == expected.outputs[0].token_ids
    assert outs[-1].outputs[0].text == expected.outputs[0].text
    finished = [f for _, it in logger.records for f in it.finished_requests]
    assert [(f.finish_reason, f.num_generation_tokens) for f in finished] == [("length", 10)]
    assert sum(it.num_generation_tokens for _, it in logger.records) == 10


def test_leaving_a_stream_aborts_and_frees_blocks(tiny_llama_dir):
    async def go():
        engine = await started(tiny_llama_dir)
        try:
            params = SamplingParams(max_tokens=400, ignore_eos=True)
            gen = engine.generate("hello world", params, "long")
            async for out in gen:
                if len(out.outputs[0].token_ids) >= 2:
                    break
            await gen.aclose()
            await wait_idle(engine)
            # The request id is free again: the engine forgot the aborted request.
            outs = [o async for o in engine.generate("hello", GREEDY, "long")]
            assert outs[-1].finished
        finally:
            await asyncio.to_thread(engine.shutdown)

    asyncio.run(go())


def test_bad_input_raises_value_error_and_engine_keeps_serving(tiny_llama_dir):
    async def go():
        engine = await started(tiny_llama_dir)
        try:
            with pytest.raises(ValueError, match="out of range"):
                await engine.add_request("bad", [5, 10**6], GREEDY)
            with pytest.raises(ValueError, match="empty"):
                await engine.add_request("empty", [], GREEDY)
            outs = [o async for o in engine.generate([5, 6, 7], GREEDY, "good")]
            assert outs[-1].outputs[0].finish_reason == "length"
        finally:
            await asyncio.to_thread(engine.shutdown)

    asyncio.run(go())


def test_shutdown_aborts_in_flight(tiny_llama_dir):
    async def go():
        engine = await started(tiny_llama_dir)
        stream = await engine.add_request(
            "r", "hello", SamplingParams(max_tokens=400, ignore_eos=True)
        )
        first = await stream.__anext__()
        assert not first.finished
        await asyncio.to_thread(engine.shutdown)
        # Cut off by the shutdown, not finished: an error, not an output with finish "abort".
        with pytest.raises(RequestAbortedError, match="engine stopped"):
            [o async for o in stream]
        assert engine.state == EngineState.STOPPED

    asyncio.run(go())
