"""StructuredOutputManager on a tiny tokenizer: compile cache, masks per draft position, drafts
cut to the grammar, matchers left where they were."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from transformers import AutoTokenizer

from pagedllm.engine.structured_output import StructuredOutputManager
from pagedllm.sampling_params import StructuredOutputsParams

VOCAB = 320  # the tiny model's (its tokenizer has 300 tokens)
EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def manager(tokenizer):
    return StructuredOutputManager(tokenizer, VOCAB, [EOS])


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def request(manager, spec):
    return SimpleNamespace(req_id="r", grammar=manager.new_matcher(spec))


def allowed(mask_row: np.ndarray) -> set[int]:
    bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")
    return {int(t) for t in np.flatnonzero(bits[:VOCAB])}


def test_compiles_once_per_key(manager):
    a = manager.compile(StructuredOutputsParams(regex="[0-9]+"))
    b = manager.compile(StructuredOutputsParams(regex="[0-9]+"))
    c = manager.compile(StructuredOutputsParams(json={"type": "object"}))
    d = manager.compile(StructuredOutputsParams(json='{"type":  "object"}'))
    assert a is b and c is d and a is not c


def test_masks_follow_the_drafts_and_leave_the_matcher_unchanged(manager, tokenizer):
    spec = StructuredOutputsParams(choice=["hello world", "hello there"])
    req = request(manager, spec)
    drafts = token_ids(tokenizer, "hello world")
    mask = manager.bitmask(req, drafts)
    assert mask.shape == (1 + len(drafts), (VOCAB + 31) // 32)
    # Row t: the tokens allowed after the first t drafts, as a fresh matcher sees them.
    for t in range(len(drafts) + 1):
        fresh = request(manager, spec)
        for tok in drafts[:t]:
            assert fresh.grammar.accept_token(tok)
        expected = manager.bitmask(fresh, [])[0]
        assert np.array_equal(mask[t], expected)
    assert allowed(mask[-1]) == {EOS}  # the choice is complete: only the stop token
    assert drafts[0] in allowed(mask[0]) and len(allowed(mask[0])) < VOCAB
    # Nothing was consumed: the request still starts from the grammar's first state.
    assert np.array_equal(manager.bitmask(req, [])[0], mask[0])


def test_drafts_are_cut_at_the_first_token_the_grammar_forbids(manager, tokenizer):
    req = request(manager, StructuredOutputsParams(regex="[0-9]{2}x"))
    digits = token_ids(tokenizer, "1")
    assert manager.valid_drafts(req, digits * 2 + digits) == digits * 2
    assert manager.valid_drafts(req, token_ids(tokenizer, "a")) == []
    manager.accept(req, digits[0])
    manager.accept(req, digits[0])
    assert manager.valid_drafts(req, digits) == []  # a third digit is not allowed
    assert manager.valid_drafts(req, token_ids(tokenizer, "x") + [EOS]) == token_ids(
        tokenizer, "x"
    ) + [EOS]
    manager.accept(req, token_ids(tokenizer, "x")[0])
    manager.accept(req, EOS)
    assert req.grammar.is_terminated()
    assert manager.bitmask(req, []) is None  # nothing to constrain any more
