"""OutputProcessor: turns the scheduler's new tokens into RequestOutputs (text, logprobs,
finish reasons), detects stop strings, and folds the n samples of a request into one output;
and a pooling request's embedding into its EmbeddingRequestOutput."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.scheduler import EngineCoreOutput
from pagedllm.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestOutput,
)
from pagedllm.sampling_params import SamplingParams


@dataclass
class SampleState:
    """One of the n samples of a request (one engine Request)."""

    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def completion(self) -> CompletionOutput:
        finished = self.finish_reason is not None
        return CompletionOutput(
            index=self.index,
            text=self.detokenizer.output_text(finished),
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class RequestState:
    """A user request: its prompt and its n samples (child requests ``{i}_{request_id}``)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: dict[str, SampleState]
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples.values())

    def make_output(self) -> RequestOutput:
        outputs = sorted((s.completion() for s in self.samples.values()), key=lambda c: c.index)
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
        )


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.child_to_parent: dict[str, str] = {}
        # Pooling requests: request id -> (prompt text, prompt token ids).
        self.pooling: dict[str, tuple[str | None, list[int]]] = {}

    def add_pooling_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int]
    ) -> None:
        self.pooling[request_id] = (prompt, prompt_token_ids)

    def add_request(self, state: RequestState) -> None:
        self.requests[state.request_id] = state
        for child_id in state.samples:
            self.child_to_parent[child_id] = state.request_id

    def child_ids(self, request_id: str) -> list[str]:
        if request_id in self.pooling:
            return [request_id]
        state = self.requests.get(request_id)
        return list(state.samples) if state else []

    def has(self, request_id: str) -> bool:
        return request_id in self.requests or request_id in self.pooling

    def process(
        self, core_outputs: list[EngineCoreOutput]
    ) -> tuple[list[RequestOutput | EmbeddingRequestOutput], list[str]]:
        """-> (outputs of requests that changed, child ids stopped by a stop string)."""
        changed: dict[str, RequestState] = {}
        stopped_by_string: list[str] = []
        pooled: list[RequestOutput | EmbeddingRequestOutput] = []
        now = time.monotonic()
        for out in core_outputs:
            if out.pooled is not None:
                pooled.append(self._pooled_output(out))
                continue
            parent_id = self.child_to_parent.get(out.req_id)
            if parent_id is None:
                continue
            state = self.requests[parent_id]
            sample = state.samples[out.req_id]
            if state.first_token_time is None:
                state.first_token_time = now
            if sample.index == 0:
                state.num_cached_tokens = out.num_cached_tokens
            self._append(sample, out)
            stop = sample.detokenizer.update(out.new_token_ids)
            sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
            if stop is not None and out.finish_reason is None:
                sample.finish_reason, sample.stop_reason = "stop", stop
                stopped_by_string.append(out.req_id)
            changed[parent_id] = state
        results = pooled
        for parent_id, state in changed.items():
            results.append(state.make_output())
            if state.finished:
                self._remove(parent_id)
        return results, stopped_by_string

    def _pooled_output(self, out: EngineCoreOutput) -> EmbeddingRequestOutput:
        prompt, prompt_ids = self.pooling.pop(out.req_id)
        return EmbeddingRequestOutput(
            request_id=out.req_id,
            prompt_token_ids=prompt_ids,
            outputs=EmbeddingOutput(out.pooled.tolist()),
            prompt=prompt,
            num_cached_tokens=out.num_cached_tokens,
        )

    def abort(self, request_id: str) -> RequestOutput | EmbeddingRequestOutput | None:
        if request_id in self.pooling:
            prompt, prompt_ids = self.pooling.pop(request_id)
            return EmbeddingRequestOutput(
                request_id, prompt_ids, None, prompt=prompt, finish_reason="abort"
            )
        state = self.requests.get(request_id)
        if state is None:
            return None
        for sample in state.samples.values():
            if sample.finish_reason is None:
                sample.finish_reason = "abort"
        self._remove(request_id)
        return state.make_output()

    def _append(self, sample: SampleState, out: EngineCoreOutput) -> None:
        sample.token_ids.extend(out.new_token_ids)
        if sample.logprobs is None:
            return
        for tok in out.sampled:
            entry = {}
            if tok.top_token_ids:
                texts = self.tokenizer.batch_decode([[t] for t in tok.top_token_ids])
                for rank, (tid, lp, text) in enumerate(
                    zip(tok.top_token_ids, tok.top_logprobs, texts), start=1
                ):
                    entry[tid] = Logprob(lp, rank, text)
            if tok.token_id not in entry:
                text = self.tokenizer.decode([tok.token_id])
                entry[tok.token_id] = Logprob(tok.logprob, tok.rank, text)
            sample.logprobs.append(entry)
            sample.cumulative_logprob = (sample.cumulative_logprob or 0.0) + tok.logprob

    def _remove(self, request_id: str) -> None:
        state = self.requests.pop(request_id)
        for child_id in state.samples:
            self.child_to_parent.pop(child_id, None)
