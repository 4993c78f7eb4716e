"""Speculative decoding (n-gram drafts) on a tiny random model: greedy outputs are exactly those
of plain decoding, in every path (native multi-query kernel, torch fallback, preemption, stop
tokens, max_tokens, mixed batches with sampled requests), and no KV block leaks."""

from __future__ import annotations

import pytest

from pagedllm.sampling_params import SamplingParams
from tests.engine.test_llm_engine import make_engine, prompts, run_all
from tests.utils import assert_no_leak, backend_names

# Drafts wherever the n-grams match (the draft policy has its own tests: test_draft_policy.py).
NGRAM = {
    "num_speculative_tokens": 4,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
    "adaptive": False,
}


def looping_prompts(n: int) -> list[list[int]]:
    """Prompts that repeat themselves, so that drafts exist from the first step."""
    return [p[:6] * 4 + p[6:] for p in prompts(n)]


def generate(engine, requests) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    return {rid: out.outputs[0] for rid, out in run_all(engine).items()}


class OracleProposer:
    """Drafts from a plain run's outputs, every third proposal with a wrong token at its third
    place: the verification (full acceptance, rejection mid-way, the bonus token) is exercised
    whether or not the random model repeats itself."""

    def __init__(self, outputs: dict, k: int = 4) -> None:
        self.outputs, self.k, self.calls = outputs, k, 0

    def propose(self, request, max_tokens: int) -> list[int]:
        self.calls += 1
        done = request.num_output_tokens
        drafts = list(self.outputs[request.req_id].token_ids[done : done + min(self.k, max_tokens)])
        if self.calls % 3 == 0 and len(drafts) >= 3:
            drafts[2] = (drafts[2] + 1) % 300
        return drafts

    def observe(self, req_id: str, num_drafts: int, num_accepted: int) -> None:
        pass

    def drop(self, req_id: str) -> None:
        pass


def compare(model_dir, requests, oracle=False, **kwargs):
    plain = generate(make_engine(model_dir, speculative_config=None, **kwargs), requests)
    engine = make_engine(model_dir, speculative_config=NGRAM, **kwargs)
    if oracle:
        engine.scheduler.proposer = OracleProposer(plain)
    spec = generate(engine, requests)
    for rid in requests:
        assert spec[rid].token_ids == plain[rid].token_ids, rid
        assert spec[rid].finish_reason == plain[rid].finish_reason, rid
    assert_no_leak(engine)
    return engine, plain, spec


def greedy(max_tokens=40, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.mark.parametrize("isa", backend_names())
def test_ngram_drafts_keep_greedy_outputs_exact(tiny_llama_dir, isa, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CPU_ISA", isa)  # each backend's verify path
    requests = {str(i): (p, greedy()) for i, p in enumerate(looping_prompts(6))}
    engine, _, spec = compare(tiny_llama_dir, requests)
    stats = engine.get_stats()
    assert stats.spec_num_draft_tokens > 50
    assert 0 < stats.spec_num_accepted_tokens <= stats.spec_num_draft_tokens
    assert all(len(o.token_ids) == 40 for o in spec.values())


def test_accepted_drafts_save_steps(tiny_llama_dir):
    requests = {str(i): (p, greedy()) for i, p in enumerate(looping_prompts(6))}
    engine, _, spec = compare(tiny_llama_dir, requests, oracle=True)
    stats = engine.get_stats()
    # Two proposals in three are right: most drafts are accepted, and a step yields several
    # tokens per request (40 tokens each in far fewer than 40 steps).
    assert stats.spec_num_accepted_tokens > 0.6 * stats.spec_num_draft_tokens
    assert engine.num_steps < 20
    assert all(len(o.token_ids) == 40 for o in spec.values())


def test_torch_backend_is_exact(tiny_llama_dir, monkeypatch):
    # Without a verify kernel a decode with drafts runs as a prefill chunk.
    monkeypatch.setenv("PAGEDLLM_CPU_ISA", "torch")
    requests = {str(i): (p, greedy(24)) for i, p in enumerate(looping_prompts(4))}
    engine, _, _ = compare(tiny_llama_dir, requests, oracle=True)
    assert engine.get_stats().spec_num_accepted_tokens > 20


def test_int8_kv_cache_with_drafts(tiny_llama_dir):
    requests = {str(i): (p, greedy(24)) for i, p in enumerate(looping_prompts(4))}
    engine, _, _ = compare(tiny_llama_dir, requests, oracle=True, kv_cache_dtype="int8")
    assert engine.get_stats().spec_num_accepted_tokens > 20


def test_stop_tokens_and_min_tokens_inside_accepted_drafts(tiny_llama_dir):
    ps = looping_prompts(4)
    base = generate(
        make_engine(tiny_llama_dir, speculative_config=None),
        {str(i): (p, greedy(30)) for i, p in enumerate(ps)},
    )
    requests = {}
    for i, p in enumerate(ps):
        out = base[str(i)].token_ids
        stop = out[len(out) // 2]  # a token the greedy output reaches mid-way
        requests[f"stop{i}"] = (p, greedy(30, stop_token_ids=[stop]))
        requests[f"min{i}"] = (p, greedy(30, stop_token_ids=[stop], min_tokens=len(out) // 2 + 1))
    _, plain, spec = compare(tiny_llama_dir, requests, oracle=True)
    assert any(o.finish_reason == "stop" for o in spec.values())
    for rid, o in spec.items():
        if rid.startswith("min"):
            assert len(o.token_ids) >= requests[rid][1].min_tokens


def test_mixed_batch_sampled_logprobs_and_penalties_are_unchanged(tiny_llama_dir):
    ps = looping_prompts(5)
    requests = {
        "greedy": (ps[0], greedy()),
        "seeded": (ps[1], SamplingParams(temperature=0.8, seed=7, max_tokens=30, ignore_eos=True)),
        "logprobs": (ps[2], greedy(logprobs=3)),
        "penalty": (ps[3], greedy(repetition_penalty=1.3)),
        "short": (ps[4], greedy(3)),
    }
    engine, plain, spec = compare(tiny_llama_dir, requests, oracle=True)
    # Same tokens, same top-3 alternatives; the values agree to fp32 rounding (the verification
    # rows change the batch's shapes).
    for got, want in zip(spec["logprobs"].logprobs, plain["logprobs"].logprobs):
        assert list(got) == list(want)
        for t in got:
            assert got[t].logprob == pytest.approx(want[t].logprob, abs=1e-4)
    # Only the plain greedy requests were given drafts.
    assert engine.get_stats().spec_num_accepted_tokens > 10


def test_preemption_and_max_model_len(tiny_llama_dir):
    # A small pool forces preemptions (by recompute) while drafts are in flight; one request
    # runs into max_model_len, which drafts must not overrun.
    ps = looping_prompts(4)
    requests = {str(i): (p, greedy(48)) for i, p in enumerate(ps)}
    requests["long"] = (ps[0] * 2, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    engine, _, spec = compare(
        tiny_llama_dir, requests, oracle=True, num_kv_blocks=40, block_size=4, max_model_len=96
    )
    assert engine.scheduler.num_preemptions_total > 0
    assert len(ps[0] * 2) + len(spec["long"].token_ids) == 96


@pytest.mark.parametrize("k", [1, 7])
def test_draft_lengths(tiny_llama_dir, k):
    requests = {str(i): (p, greedy(20)) for i, p in enumerate(looping_prompts(3))}
    plain = generate(make_engine(tiny_llama_dir, speculative_config=None), requests)
    engine = make_engine(tiny_llama_dir, speculative_config={**NGRAM, "num_speculative_tokens": k})
    spec = generate(engine, requests)
    assert {r: o.token_ids for r, o in spec.items()} == {r: o.token_ids for r, o in plain.items()}
    assert_no_leak(engine)


def test_too_many_draft_rows_for_the_kernel_is_a_clear_error(tiny_llama_dir, ops, monkeypatch):
    # The limit is the native verify kernel's (the backend declares it; the engine asks).
    monkeypatch.setenv("PAGEDLLM_CPU_ISA", ops.isa)
    with pytest.raises(ValueError, match=f"num_speculative_tokens.*{ops.isa} verify kernel"):
        make_engine(tiny_llama_dir, speculative_config={"num_speculative_tokens": 40})


def test_torch_backend_takes_any_number_of_drafts(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CPU_ISA", "torch")  # drafts verified as prefill chunks
    engine = make_engine(tiny_llama_dir, speculative_config={"num_speculative_tokens": 40})
    assert engine.runner.backend.attention.max_verify_rows is None


def test_on_by_default_and_off_with_none(tiny_llama_dir):
    assert make_engine(tiny_llama_dir).scheduler.proposer is not None
    for off in (None, "none"):
        assert make_engine(tiny_llama_dir, speculative_config=off).scheduler.proposer is None
