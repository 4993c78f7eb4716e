"""DraftPolicy: the control-step measurement of a draft row's cost, and the per-request gate
that stops drafts which do not pay (and lets drafts that pay run); end to end, a proposer whose
drafts never match ends up with a draft row for under 4% of its tokens, greedy outputs
unchanged."""

from __future__ import annotations

import random

import pytest

from pagedllm.engine import draft_policy as dp
from pagedllm.engine.draft_policy import DraftPolicy
from tests.engine.test_llm_engine import make_engine
from tests.engine.test_spec_decode import NGRAM, generate, greedy, looping_prompts
from tests.utils import assert_no_leak


def measure(policy: DraftPolicy, cost: float, decodes=32, drafts=16, per_token=1e-3) -> None:
    """Steps of a machine where a draft row costs ``cost`` plain tokens, until one control
    step has run."""
    plain = decodes * per_token
    while True:
        control = policy.control_step()
        if control:
            policy.observe_step(decodes, 0, 0, plain)
            return
        policy.observe_step(decodes, drafts, 0, plain + drafts * cost * per_token)


def test_control_steps_measure_the_relative_cost_of_a_draft_row():
    policy = DraftPolicy()
    assert policy.relative_cost is None
    for _ in range(dp.MIN_SAMPLES):
        measure(policy, cost=0.6)
    assert policy.relative_cost == pytest.approx(0.6)
    # the median shrugs off one wild sample (a step slowed by something else)
    policy.samples.append(40.0)
    assert policy.relative_cost == pytest.approx(0.6)


def test_a_control_step_disturbed_by_a_prefill_or_another_batch_is_no_sample():
    policy = DraftPolicy()
    for _ in range(dp.PROBE_INTERVAL):
        policy.observe_step(32, 16, 0, 0.05)
    assert policy.control_step()
    policy.observe_step(32, 0, 100, 0.02)  # a prompt chunk joined the control step
    assert not policy.samples
    policy.observe_step(32, 16, 0, 0.05)
    assert policy.control_step()
    policy.observe_step(31, 0, 0, 0.02)  # a request finished in between
    assert not policy.samples
    assert not policy.control_step()  # the previous step had no drafts: nothing to pair with


def test_requests_whose_drafts_do_not_pay_pause_with_doubling_pauses():
    policy = DraftPolicy()
    for _ in range(dp.MIN_SAMPLES):
        measure(policy, cost=0.5)
    assert policy.max_drafts("low") is None  # a new request, nothing known yet: no limit
    policy.observe_request("low", 4, 0)  # none accepted, below half of 0.5: pause 2, try one
    assert [policy.max_drafts("low") for _ in range(3)] == [0, 0, 1]
    policy.observe_request("low", 1, 0)  # still low: 4 steps
    assert [policy.max_drafts("low") for _ in range(5)] == [0] * 4 + [1]
    for _ in range(20):
        policy.observe_request("low", 1, 0)
    assert policy.requests["low"].pause == dp.MAX_PAUSE
    policy.requests["low"].pause = 0
    policy.observe_request("low", 1, 1)  # the draft tried after a pause was accepted: full k
    assert policy.max_drafts("low") is None
    # drafts that pay are never held back
    for _ in range(20):
        policy.observe_request("high", 4, 3)
        assert policy.max_drafts("high") is None
    # where drafts cost next to nothing (cheap verify) even a low acceptance pays
    cheap = DraftPolicy()
    for _ in range(dp.MIN_SAMPLES):
        measure(cheap, cost=0.05)
    cheap.observe_request("low", 8, 1)
    assert cheap.max_drafts("low") is None
    cheap.drop("low")
    assert "low" not in cheap.requests


def test_before_the_cost_is_measured_the_gate_assumes_the_prior():
    policy = DraftPolicy()
    assert policy.relative_cost is None and policy.threshold == dp.GATE * dp.PRIOR_COST
    policy.observe_request("a", 4, 0)  # drafts that fail from the first step pause at once
    assert policy.max_drafts("a") == 0
    policy.observe_request("b", 4, 3)
    assert policy.max_drafts("b") is None


def test_new_requests_start_paused_where_the_population_s_drafts_do_not_pay():
    policy = DraftPolicy()
    for _ in range(dp.MIN_SAMPLES):
        measure(policy, cost=0.5)
    for i in range(10):
        policy.observe_request(str(i), 4, 0)
    assert policy.max_drafts("new") == 0
    assert policy.requests["new"].pause == 2**dp.NEW_LEVEL - 1


class WrongProposer:
    """Drafts that never match: random tokens (the model's vocabulary is 300 here)."""

    def __init__(self) -> None:
        self.rng = random.Random(0)
        self.drafts = 0

    def propose(self, request, max_tokens: int) -> list[int]:
        drafts = [self.rng.randrange(300) for _ in range(min(4, max_tokens))]
        self.drafts += len(drafts)
        return drafts

    def observe(self, req_id: str, num_drafts: int, num_accepted: int) -> None:
        pass

    def drop(self, req_id: str) -> None:
        pass


def test_drafts_that_never_match_stop_being_proposed(tiny_llama_dir, monkeypatch):
    # The tiny model's steps are too short to time reliably: the policy is told the cost.
    monkeypatch.setattr(DraftPolicy, "relative_cost", property(lambda self: 0.5))
    requests = {str(i): (p, greedy(max_tokens=300)) for i, p in enumerate(looping_prompts(4))}
    plain = generate(make_engine(tiny_llama_dir, speculative_config=None), requests)
    engine = make_engine(tiny_llama_dir, speculative_config={**NGRAM, "adaptive": True})
    assert engine.scheduler.draft_policy is not None
    engine.scheduler.proposer = WrongProposer()
    spec = generate(engine, requests)
    for rid in requests:
        assert spec[rid].token_ids == plain[rid].token_ids
    # 4 requests x 300 tokens: a draft row for under 4% of them (the pauses double to 128 steps)
    drafts = engine.scheduler.proposer.drafts
    assert 0 < drafts < 0.04 * 4 * 300, drafts
    assert_no_leak(engine)
