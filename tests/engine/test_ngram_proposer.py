"""NgramProposer == a brute-force scan for the latest earlier occurrence of the suffix, as
tokens are appended a few at a time (the index is incremental)."""

from __future__ import annotations

import random

from pagedllm.config import SpeculativeConfig
from pagedllm.engine.ngram_proposer import NgramProposer
from pagedllm.engine.request import Request
from pagedllm.sampling_params import SamplingParams


def brute_force(tokens: list[int], nmin: int, nmax: int, k: int) -> list[int]:
    for n in range(nmax, nmin - 1, -1):
        if len(tokens) <= n:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_matches_brute_force_while_tokens_are_appended():
    rng = random.Random(0)
    config = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)
    proposer = NgramProposer(config)
    num_hits = 0
    for trial in range(20):
        req = Request(
            str(trial),
            [rng.randrange(6) for _ in range(rng.randrange(1, 12))],
            SamplingParams(max_tokens=100),
        )
        for _ in range(30):
            for _ in range(rng.randrange(1, 5)):  # accepted drafts arrive several at a time
                req.append_output_token(rng.randrange(6))
            want = brute_force(req.all_token_ids, 1, 3, 4)
            assert proposer.propose(req, 10) == want
            num_hits += bool(want)
    assert num_hits > 100  # a 6-token alphabet repeats: the lookup is exercised


def test_caps_and_no_match():
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=3))
    req = Request("a", [5, 6, 7, 8, 9, 5, 6], SamplingParams(max_tokens=10))
    assert proposer.propose(req, 10) == [7, 8, 9]
    assert proposer.propose(req, 2) == [7, 8]  # max_tokens left
    assert proposer.propose(req, 0) == []
    req.append_output_token(1)  # suffix (6, 1) / (5, 6, 1) never occurred
    assert proposer.propose(req, 10) == []
    proposer.drop("a")
    assert "a" not in proposer.indexes


def test_bad_configs_are_rejected():
    import pytest

    for raw, match in [
        ('{"method": "eagle"}', "method"),
        ('{"num_speculative_tokens": 0}', "num_speculative_tokens"),
        ('{"prompt_lookup_min": 4, "prompt_lookup_max": 2}', "prompt_lookup_min"),
        ('{"k": 1}', "unknown keys"),
        ("{not json", "JSON"),
        ("[1]", "object"),
    ]:
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.parse(raw)
    assert SpeculativeConfig.parse(None) is None
    assert SpeculativeConfig.parse("none") is None
    assert SpeculativeConfig.parse("auto") == SpeculativeConfig()
    assert SpeculativeConfig.parse({"num_speculative_tokens": 2}).num_speculative_tokens == 2


def test_failed_drafts_shrink_then_pause_the_proposals():
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=4))
    req = Request("a", [1, 2, 3, 4, 5, 6, 7] * 3, SamplingParams(max_tokens=100))
    assert proposer.propose(req, 10) == [1, 2, 3, 4]
    proposer.observe("a", 4, 0)  # all rejected: a single draft next
    assert proposer.propose(req, 10) == [1]
    proposer.observe("a", 1, 0)  # two misses in a row: pause 1 step
    assert proposer.propose(req, 10) == []
    assert proposer.propose(req, 10) == [1]
    proposer.observe("a", 1, 0)  # three: pause 3
    assert [proposer.propose(req, 10) for _ in range(4)] == [[], [], [], [1]]
    proposer.observe("a", 1, 1)  # one accepted: back to k
    assert proposer.propose(req, 10) == [1, 2, 3, 4]
    for _ in range(10):
        proposer.observe("a", 1, 0)
    assert proposer.indexes["a"].pause == 16  # capped
