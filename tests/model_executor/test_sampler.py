"""The batched sampler: each filter and penalty does what its definition says, row by row."""

from __future__ import annotations

import pytest
import torch

from pagedllm.model_executor.backends.kernels import NativeKernels, TorchKernels
from pagedllm.model_executor.request_state import CachedRequestState, StepRequest
from pagedllm.model_executor.sampler import (
    Penalties,
    Sampler,
    SamplingBatch,
    apply_penalties,
    apply_top_k_top_p,
    greedy_argmax,
    inverse_cdf_draw,
)
from pagedllm.model_executor.sampling_metadata import build_sampling_batch
from pagedllm.sampling_params import SamplingParams
from tests.utils import backend_names


def _batch(n, **kw):
    kw.setdefault("temperature", torch.ones(n))
    return SamplingBatch(all_greedy=False, **kw)


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    batch = _batch(2, temperature=torch.tensor([0.0, 1.0]))
    for _ in range(20):
        assert Sampler()(logits, batch).token_ids[0].item() == 1


def _kernels(isa: str):
    from pagedllm.model_executor.ops import native_ops

    return TorchKernels() if isa == "torch" else NativeKernels(native_ops(isa))


@pytest.mark.parametrize("isa", backend_names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [49152, 1003, 5])
def test_greedy_argmax_matches_torch_argmax_with_ties(isa, dtype, vocab):
    kernels = _kernels(isa)
    torch.manual_seed(0)
    logits = torch.randn(9, vocab).to(dtype)
    logits[1] = float("-inf")  # all equal: index 0
    logits[2, :] = 0.0
    logits[2, [vocab - 1, vocab // 2, 3 % vocab]] = 5.0  # ties: the lowest index wins
    logits[3, vocab - 1] = 100.0  # in the tail past the last full 16-lane vector
    got = greedy_argmax(logits, kernels=kernels)
    assert torch.equal(got, logits.float().argmax(dim=-1))
    batch = SamplingBatch(temperature=torch.zeros(9), all_greedy=True)
    assert torch.equal(Sampler(kernels)(logits, batch).token_ids, got)


def test_top_k_top_p_keep_exactly_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    out = apply_top_k_top_p(logits.clone(), torch.tensor([2, 4]), None)
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    assert torch.isfinite(out[1]).all()
    out = apply_top_k_top_p(logits.clone(), None, torch.tensor([0.7, 1.0]))
    # 0.5 alone < 0.7, 0.5 + 0.3 >= 0.7: the two most likely tokens survive
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    assert torch.isfinite(out[1]).all()


def test_samples_follow_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    batch = _batch(4000, top_k=torch.full((4000,), 3))
    counts = torch.bincount(Sampler()(logits, batch).token_ids, minlength=4).float() / 4000
    assert counts[3] == 0
    expected = torch.tensor([0.5, 0.3, 0.15]) / 0.95
    assert torch.allclose(counts[:3], expected, atol=0.03)


def test_temperature_samples_match_softmax_over_a_large_vocab():
    torch.manual_seed(0)
    row = torch.randn(1, 1000) * 2
    n = 20000
    batch = _batch(n, temperature=torch.full((n,), 0.7))
    tokens = Sampler()(row.repeat(n, 1), batch).token_ids
    probs = torch.softmax(row[0] / 0.7, dim=-1)
    top = probs.topk(5).indices
    freq = torch.bincount(tokens, minlength=1000).float() / n
    assert torch.allclose(freq[top], probs[top], atol=0.015)


def test_masked_tokens_at_either_end_of_the_vocab_are_never_drawn():
    torch.manual_seed(0)
    logits = torch.tensor([[9.0, 1.0, 1.0, 9.0]]).repeat(3000, 1)
    # top_k=2 keeps the two 9.0s: tokens 0 and 3, each with probability 0.5
    batch = _batch(3000, top_k=torch.full((3000,), 2))
    tokens = Sampler()(logits, batch).token_ids
    assert set(tokens.tolist()) == {0, 3}
    logits = torch.tensor([[-1.0, 2.0, 2.0, -1.0]]).repeat(3000, 1)
    tokens = Sampler()(logits, _batch(3000, top_k=torch.full((3000,), 2))).token_ids
    assert set(tokens.tolist()) == {1, 2}


def test_min_p_drops_tokens_below_the_scaled_threshold():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(2000, 1)
    batch = _batch(2000, min_p=torch.full((2000,), 0.2))  # threshold 0.12: drops 0.1
    tokens = Sampler()(logits, batch).token_ids
    assert (tokens != 2).all() and (tokens == 1).any()


@pytest.mark.parametrize("vocab", [7, 1000, 49152])
def test_inverse_cdf_draw_picks_the_token_of_one_cumulative_sum(vocab):
    """The two-level draw (block sums, then one block) lands on the token a float64 cumulative
    sum over the whole row picks, masked tokens included (zeros: never drawn)."""
    torch.manual_seed(vocab)
    probs = torch.softmax(torch.randn(64, vocab) * 3, dim=-1)
    probs[:, ::3] = 0.0  # masked tokens, on block edges too
    probs /= probs.sum(dim=-1, keepdim=True)
    u = torch.rand(64, 1, dtype=torch.float64)
    u[0], u[1] = 0.0, 1.0 - 2.0**-53  # the ends of [0, 1)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    expected = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    got = inverse_cdf_draw(probs, u)
    assert torch.equal(got, expected)
    assert (probs.gather(1, got.unsqueeze(1)) > 0).all()


def test_inverse_cdf_draw_never_lands_on_a_zero_probability_token():
    probs = torch.zeros(4, 300)  # padded to two blocks; mass only at 1, 255, 256 and 299
    probs[:, [1, 255, 256, 299]] = torch.tensor([0.25, 0.25, 0.25, 0.25])
    for u in torch.linspace(0, 1 - 2.0**-53, 101, dtype=torch.float64):
        ids = inverse_cdf_draw(probs, torch.full((4, 1), float(u), dtype=torch.float64))
        assert set(ids.tolist()) <= {1, 255, 256, 299}


def test_unit_temperature_and_no_greedy_rows_skip_work_not_results():
    """The flags build_sampling_batch sets for the usual serving step (every row sampled at
    temperature 1) change which tensors are computed, not the tokens drawn."""
    logits = torch.randn(5, 300)
    rows = {r: torch.Generator().manual_seed(r) for r in range(5)}
    plain = Sampler()(logits, _batch(5, generators=rows)).token_ids
    rows = {r: torch.Generator().manual_seed(r) for r in range(5)}
    flagged = _batch(5, generators=rows, any_greedy=False, unit_temperature=True)
    assert torch.equal(Sampler()(logits, flagged).token_ids, plain)
    # a greedy row (temperature 0) still takes the argmax under unit_temperature
    mixed = _batch(2, temperature=torch.tensor([0.0, 1.0]), unit_temperature=True)
    assert Sampler()(logits[:2], mixed).token_ids[0] == logits[0].argmax()


@pytest.mark.parametrize(
    ("temperatures", "any_greedy", "unit"),
    [((1.0, 1.0), False, True), ((0.0, 1.0), True, True), ((0.7, 1.0), False, False)],
)
def test_build_sampling_batch_flags(temperatures, any_greedy, unit):
    reqs = [
        StepRequest(
            CachedRequestState(str(i), [1, 2], 2, SamplingParams(temperature=t), i, 1, 2), 2, 1, []
        )
        for i, t in enumerate(temperatures)
    ]
    batch = build_sampling_batch(reqs, {}, 10, torch.device("cpu"))
    assert (batch.any_greedy, batch.unit_temperature) == (any_greedy, unit)


def test_seeded_rows_reproduce_regardless_of_neighbours():
    logits = torch.randn(3, 50)
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = Sampler()(logits, _batch(3, generators={1: gen_a})).token_ids[1]
    noisy = torch.cat([torch.randn(1, 50), logits[1:2], torch.randn(1, 50)])
    b = Sampler()(noisy, _batch(3, generators={1: gen_b})).token_ids[1]
    assert a == b


def test_penalties_match_their_definitions():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    p = Penalties(
        presence=torch.tensor([0.5]),
        frequency=torch.tensor([0.25]),
        repetition=torch.tensor([2.0]),
        output_counts=torch.tensor([[2.0, 0.0, 0.0, 1.0]]),
        prompt_mask=torch.tensor([[False, True, False, False]]),
    )
    out = apply_penalties(logits.clone(), p)
    # token 0: generated twice: 2/2 - 0.25*2 - 0.5; token 1: in prompt: -2*2;
    # token 2: untouched; token 3: generated once: 0.5/2 - 0.25 - 0.5
    assert torch.allclose(out, torch.tensor([[0.0, -4.0, 1.0, -0.5]]))


def test_banned_tokens_and_logprobs():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    batch = SamplingBatch(
        temperature=torch.zeros(1), all_greedy=True, banned=[(0, [0])], max_num_logprobs=2
    )
    out = Sampler()(logits, batch)
    assert out.token_ids.item() == 1
    raw = torch.log_softmax(logits, -1)  # logprobs are of the raw distribution
    assert torch.allclose(out.logprobs, raw[0, 1:2]) and out.ranks.item() == 2
    assert out.top_ids.tolist() == [[0, 1]]


@pytest.mark.parametrize("isa", backend_names())
def test_greedy_settles_bf16_near_ties_with_exact_logits(isa):
    """bf16 rounding can tie two candidates fp32 tells apart: rows whose best and runner-up
    differ by at most one bf16 step ask for those candidates' exact logits; clear rows don't."""
    kernels = _kernels(isa)
    logits = torch.full((4, 50), -3.0)
    logits[0, 5] = logits[0, 9] = 20.0  # a tie in bf16
    logits[1, 7], logits[1, 8] = 20.0, 19.0  # clear: 8 bf16 steps apart
    logits[2, 3], logits[2, 30] = 20.0, 19.875  # one bf16 step (0.125 at 20) apart
    logits[3, 2], logits[3, 40] = 20.0, 19.75  # two steps apart: clear
    logits = logits.to(torch.bfloat16)
    asked = {}

    def exact(row, token_ids):
        asked[row] = token_ids.tolist()
        return token_ids.float()  # prefers the highest token id among the candidates

    assert greedy_argmax(logits, kernels=kernels).tolist() == [5, 7, 3, 2]
    assert greedy_argmax(logits, exact, kernels).tolist() == [9, 7, 30, 2]
    assert asked == {0: [5, 9], 2: [3, 30]}
    batch = SamplingBatch(temperature=torch.zeros(4), all_greedy=True)
    assert Sampler(kernels)(logits, batch, exact).token_ids.tolist() == [9, 7, 30, 2]
    asked.clear()
    assert greedy_argmax(logits.float(), exact, kernels).tolist() == [5, 7, 3, 2]
    assert asked == {}, "fp32 logits are exact already"


def test_greedy_near_ties_are_settled_alike_whatever_the_batch():
    """A greedy row's pick must not depend on its neighbours: beside a sampled row, a row with
    logprobs, or a row with penalties, it is settled by the fp32 tie-break as when alone."""
    logits = torch.full((2, 50), -3.0)
    logits[0, 5] = logits[0, 9] = 20.0  # a bf16 tie the exact logits settle for 9
    logits = logits.to(torch.bfloat16)

    def exact(row, token_ids):
        return token_ids.float()  # prefers the highest candidate id

    alone = SamplingBatch(temperature=torch.zeros(1), all_greedy=True)
    assert Sampler()(logits[:1], alone, exact).token_ids.tolist() == [9]
    beside_sampled = _batch(2, temperature=torch.tensor([0.0, 1.0]))
    assert Sampler()(logits, beside_sampled, exact).token_ids[0].item() == 9
    with_logprobs = SamplingBatch(temperature=torch.zeros(2), all_greedy=True, max_num_logprobs=0)
    assert Sampler()(logits, with_logprobs, exact).token_ids[0].item() == 9
    penalties = Penalties(
        presence=torch.tensor([0.0, 0.5]),
        frequency=torch.zeros(2),
        repetition=torch.ones(2),
        output_counts=torch.zeros(2, 50, dtype=torch.int64),
        prompt_mask=torch.zeros(2, 50, dtype=torch.bool),
    )
    beside_penalized = SamplingBatch(
        temperature=torch.zeros(2), all_greedy=True, penalties=penalties
    )
    assert Sampler()(logits, beside_penalized, exact).token_ids[0].item() == 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 2, 15, 16, 17, 100, 1000])
def test_argmax_gap_rows_matches_top2(ops, dtype, vocab):
    torch.manual_seed(vocab)
    logits = torch.randn(20, vocab).mul(4).round().to(dtype)  # rounding makes ties common
    ids, gaps = ops.argmax_gap_rows(logits)
    assert torch.equal(ids, logits.float().argmax(dim=-1))
    if vocab == 1:
        assert torch.isinf(gaps).all()
        return
    top2 = logits.float().topk(2, dim=-1).values
    torch.testing.assert_close(gaps, top2[:, 0] - top2[:, 1], rtol=0, atol=0)


@pytest.mark.parametrize("isa", backend_names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [5, 32, 100, 49152])
def test_token_bitmask_forbids_exactly_the_cleared_bits_of_its_rows(isa, dtype, vocab):
    torch.manual_seed(0)
    logits = torch.randn(4, vocab).to(dtype)
    allowed = torch.rand(2, vocab) < 0.3
    allowed[:, vocab - 1] = True  # the last token, in the last word's highest used bit
    allowed[0, : min(64, vocab)] = False  # whole words forbidden
    allowed[1, : min(64, vocab)] = True  # whole words allowed
    words = (vocab + 31) // 32
    bits = torch.zeros(2, words * 32, dtype=torch.int64)
    bits[:, :vocab] = allowed.long()
    bits[:, vocab:] = 1  # bits past the vocabulary are ignored
    bitmask = (bits.view(2, words, 32) << torch.arange(32)).sum(-1)
    bitmask = bitmask.where(bitmask < 2**31, bitmask - 2**32).to(torch.int32)
    expected = logits.clone()
    expected[1] = expected[1].masked_fill(~allowed[0], float("-inf"))
    expected[3] = expected[3].masked_fill(~allowed[1], float("-inf"))
    _kernels(isa).apply_token_bitmask(logits, torch.tensor([1, 3]), bitmask)
    assert torch.equal(logits, expected)


def test_token_bitmask_rejects_bad_shapes(ops):
    logits = torch.zeros(2, 100)
    with pytest.raises(RuntimeError, match="narrower than the vocab"):
        ops.apply_token_bitmask(logits, torch.tensor([0]), torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.apply_token_bitmask(logits, torch.tensor([2]), torch.zeros(1, 4, dtype=torch.int32))
