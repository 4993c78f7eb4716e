"""Scheduler: decides which requests' tokens run in each step (iteration-level continuous
batching). It thinks in tokens, as vLLM v1 does: each request has ``num_computed_tokens`` and
``num_tokens``, and a step gives each one a number of tokens under a token budget, so chunked
prefill, prefix hits and preemption need no special modes. It imports no torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from pagedllm.config import SchedulerConfig
from pagedllm.engine.draft_policy import DraftPolicy
from pagedllm.engine.kv_cache_manager import KVCacheManager
from pagedllm.engine.ngram_proposer import NgramProposer
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.structured_output import StructuredOutputManager
from pagedllm.engine.waiting_queue import WaitingQueue, max_seats_per_group
from pagedllm.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SampledToken,
    SchedulerOutput,
)


@dataclass
class EngineCoreOutput:
    """New tokens of one request after a step."""

    req_id: str
    new_token_ids: list[int]
    sampled: list[SampledToken]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    pooled: Any = None  # a pooling request's embedding


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        proposer: NgramProposer | None = None,
        draft_policy: DraftPolicy | None = None,
        structured_output: StructuredOutputManager | None = None,
    ) -> None:
        self.config = config
        self.structured_output = structured_output
        self.kv_cache_manager = kv_cache_manager
        self.proposer = proposer
        self.draft_policy = draft_policy
        self.spec_num_draft_tokens = 0
        self.spec_num_accepted_tokens = 0
        self.requests: dict[str, Request] = {}
        self.waiting = WaitingQueue(max_seats_per_group(config.max_num_seqs))
        self.running: list[Request] = []
        self.finished_req_ids: set[str] = set()
        self.num_preemptions_total = 0

    # ---- requests in and out ------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.req_id in self.requests:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        max_len = min(request.num_prompt_tokens + request.max_tokens, self.config.max_model_len)
        if not self.kv_cache_manager.can_fit(max_len):
            raise ValueError(
                f"request {request.req_id!r} needs up to {max_len} tokens of KV cache but the "
                f"cache holds only {self.kv_cache_manager.num_blocks} blocks of "
                f"{self.kv_cache_manager.block_size}: raise kv_cache_memory or lower max_tokens"
            )
        self.requests[request.req_id] = request
        self.waiting.append(request)

    def finish_requests(self, req_ids: list[str], status: RequestStatus) -> list[Request]:
        """Retire requests (aborted, or stopped by a stop string); their blocks free at once."""
        assert status.is_finished
        out = []
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free(request)
            out.append(request)
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput()
        preempted: list[Request] = []

        # 1. Running requests first: decodes, and prefills still in progress (chunked). A
        # control step (see DraftPolicy) runs the decodes without their drafts.
        control = self.draft_policy is not None and self.draft_policy.control_step()
        idx = 0
        while idx < len(self.running) and budget > 0:
            request = self.running[idx]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                idx += 1
                continue
            # A decode with drafts runs them too, as far as the budget allows.
            drafts = request.spec_token_ids[: budget - 1] if num_new == 1 and not control else []
            num_new += len(drafts)
            while True:
                if self.kv_cache_manager.allocate_slots(request, num_new) is not None:
                    break
                # Out of blocks: preempt the most recently admitted request by recompute.
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break
            self._schedule_running(out, request, num_new - len(drafts), drafts)
            budget -= num_new
            idx += 1

        # 2. Admit waiting requests (fair between groups, see WaitingQueue) while seats, budget
        # and blocks allow.
        seats = Counter(r.group_id for r in self.running)
        loras = {r.lora_id for r in self.running if r.lora_id is not None}
        while not preempted and self.waiting and budget > 0:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting.peek(seats, self._lora_fits(loras))
            if request is None:
                break
            hit_blocks, num_hit = [], 0
            if request.num_computed_tokens == 0:
                hit_blocks, num_hit = self.kv_cache_manager.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if self.kv_cache_manager.allocate_slots(request, num_new, hit_blocks) is None:
                break
            self.waiting.remove(request)
            seats[request.group_id] += 1
            if request.lora_id is not None:
                loras.add(request.lora_id)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_hit
            self.running.append(request)
            self._schedule_new(out, request, num_new)
            budget -= num_new

        if self.structured_output is not None:
            self._grammar_bitmasks(out)
        out.preempted_req_ids = [r.req_id for r in preempted]
        out.finished_req_ids = self.finished_req_ids
        self.finished_req_ids = set()
        return out

    def update_from_output(
        self,
        scheduler_output: SchedulerOutput,
        runner_output: ModelRunnerOutput,
        step_seconds: float | None = None,
    ) -> list[EngineCoreOutput]:
        """``step_seconds``: how long the model ran the step (the draft policy's measure)."""
        if self.draft_policy is not None and step_seconds is not None:
            self._observe_step(scheduler_output, step_seconds)
        outputs = []
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue
            num_drafts = len(scheduler_output.spec_token_ids.get(req_id, ()))
            end = request.num_computed_tokens + num_tokens - num_drafts
            if end < request.num_tokens:  # a prompt chunk that does not end the prompt
                request.num_computed_tokens += num_tokens
                continue
            if request.pooling_params is not None:  # its prompt is done: so is the request
                request.num_computed_tokens += num_tokens
                request.status = RequestStatus.FINISHED_STOPPED
                outputs.append(
                    EngineCoreOutput(
                        req_id=req_id,
                        new_token_ids=[],
                        sampled=[],
                        finish_reason=request.status.finish_reason,
                        num_cached_tokens=request.num_cached_tokens or 0,
                        pooled=runner_output.pooled[req_id],
                    )
                )
                self.running.remove(request)
                self._free(request)
                continue
            tokens = runner_output.sampled[req_id]
            # The newest token and the accepted drafts now have KV; a rejected draft's KV is
            # overwritten later (its slot lies past num_computed_tokens).
            num_accepted = len(tokens) - 1
            request.num_computed_tokens += num_tokens - (num_drafts - num_accepted)
            self.spec_num_draft_tokens += num_drafts
            self.spec_num_accepted_tokens += num_accepted
            if self.proposer is not None:
                self.proposer.observe(request.req_id, num_drafts, num_accepted)
            if self.draft_policy is not None:
                self.draft_policy.observe_request(request.req_id, num_drafts, num_accepted)
            new = []
            for tok in tokens:
                request.append_output_token(tok.token_id)
                if request.grammar is not None:
                    StructuredOutputManager.accept(request, tok.token_id)
                new.append(tok)
                self._check_stop(request)
                if request.is_finished:
                    break
            request.spec_token_ids = self._propose(request)
            outputs.append(
                EngineCoreOutput(
                    req_id=request.req_id,
                    new_token_ids=[t.token_id for t in new],
                    sampled=new,
                    finish_reason=request.status.finish_reason,
                    stop_reason=request.stop_reason,
                    num_cached_tokens=request.num_cached_tokens or 0,
                )
            )
            if request.is_finished:
                self.running.remove(request)
                self._free(request)
        return outputs

    def make_stats(self) -> SchedulerStats:
        pc = self.kv_cache_manager.prefix_cache_stats
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv_cache_manager.usage(),
            num_preemptions_total=self.num_preemptions_total,
            prefix_cache_queries=pc.queries,
            prefix_cache_hits=pc.hits,
            spec_num_draft_tokens=self.spec_num_draft_tokens,
            spec_num_accepted_tokens=self.spec_num_accepted_tokens,
        )

    # ---- helpers -------------------------------------------------------------------------------
    def _schedule_running(
        self, out: SchedulerOutput, request: Request, num_new: int, drafts: list[int]
    ) -> None:
        """A request the runner knows: send what changed since its last step."""
        block_ids = self.kv_cache_manager.block_ids(request.req_id)
        out.cached_requests.append(
            CachedRequestData(
                req_id=request.req_id,
                new_token_ids=request.all_token_ids[request.num_tokens_sent :],
                new_block_ids=block_ids[request.num_blocks_sent :],
                num_computed_tokens=request.num_computed_tokens,
            )
        )
        request.num_tokens_sent, request.num_blocks_sent = request.num_tokens, len(block_ids)
        self._count(out, request, num_new, drafts)

    def _schedule_new(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        """A request admitted (first, or again after a preemption): send all of it."""
        block_ids = self.kv_cache_manager.block_ids(request.req_id)
        out.new_requests.append(
            NewRequestData(
                req_id=request.req_id,
                prompt_token_ids=request.prompt_token_ids,
                output_token_ids=list(request.output_token_ids),
                sampling_params=request.sampling_params,
                block_ids=list(block_ids),
                num_computed_tokens=request.num_computed_tokens,
                pooling_params=request.pooling_params,
                lora_id=request.lora_id,
            )
        )
        request.num_tokens_sent, request.num_blocks_sent = request.num_tokens, len(block_ids)
        self._count(out, request, num_new, [])

    @staticmethod
    def _count(out: SchedulerOutput, request: Request, num_new: int, drafts: list[int]) -> None:
        out.num_scheduled_tokens[request.req_id] = num_new + len(drafts)
        if drafts:
            out.spec_token_ids[request.req_id] = drafts
        newest = request.num_computed_tokens + 1 == request.num_tokens
        if num_new == 1 and newest and request.num_output_tokens > 0:  # not a prompt's end
            out.num_decodes += 1
        else:
            out.num_prefill_tokens += num_new

    def _lora_fits(self, loras: set[int]):
        """Admission filter: at most max_loras different adapters run in one step."""
        limit = self.config.max_loras
        if limit is None:
            return None
        return lambda r: r.lora_id is None or r.lora_id in loras or len(loras) < limit

    def _grammar_bitmasks(self, out: SchedulerOutput) -> None:
        """The masks of the constrained requests that sample this step (their last prompt
        chunk, or a decode with its drafts)."""
        assert self.structured_output is not None
        for req_id, num_tokens in out.num_scheduled_tokens.items():
            request = self.requests[req_id]
            if request.grammar is None:
                continue
            drafts = out.spec_token_ids.get(req_id, [])
            if request.num_computed_tokens + num_tokens - len(drafts) < request.num_tokens:
                continue  # a prompt chunk that does not end the prompt: nothing is sampled
            mask = self.structured_output.bitmask(request, drafts)
            if mask is not None:
                out.grammar_bitmasks[req_id] = mask

    def _observe_step(self, out: SchedulerOutput, seconds: float) -> None:
        assert self.draft_policy is not None
        self.draft_policy.observe_step(
            out.num_decodes, out.num_draft_tokens, out.num_prefill_tokens, seconds
        )

    def _propose(self, request: Request) -> list[int]:
        """Drafts for the next step: greedy requests without penalties or logprobs only, where
        checking a draft is comparing it with the argmax, and where the draft policy finds
        they pay."""
        params = request.sampling_params
        if (
            self.proposer is None
            or request.is_finished
            or not params.is_greedy
            or params.has_penalties
            or params.logprobs is not None
        ):
            return []
        limit = None
        if self.draft_policy is not None:
            limit = self.draft_policy.max_drafts(request.req_id)
            if limit == 0:
                return []
        # The drafts and the token sampled after them must fit max_tokens and max_model_len.
        room = min(
            request.max_tokens - request.num_output_tokens,
            self.config.max_model_len - request.num_tokens,
        )
        drafts = self.proposer.propose(request, room - 1 if limit is None else min(limit, room - 1))
        if request.grammar is not None and self.structured_output is not None:
            drafts = self.structured_output.valid_drafts(request, drafts)
        return drafts

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.spec_token_ids = []
        request.num_tokens_sent = request.num_blocks_sent = 0
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    def _free(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        if self.proposer is not None:
            self.proposer.drop(request.req_id)
        if self.draft_policy is not None:
            self.draft_policy.drop(request.req_id)
        self.finished_req_ids.add(request.req_id)
        del self.requests[request.req_id]

    def _check_stop(self, request: Request) -> None:
        params = request.sampling_params
        last = request.output_token_ids[-1]
        if request.num_output_tokens >= params.min_tokens and last in params.all_stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                request.stop_reason = last
            return
        if (
            request.num_output_tokens >= request.max_tokens
            or request.num_tokens >= self.config.max_model_len
        ):
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
