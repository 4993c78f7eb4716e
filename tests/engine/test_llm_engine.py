"""LLMEngine on a tiny random model: continuous batching, prefix caching, preemption, n > 1,
seeds, stop conditions, aborts, bad input, and no leaked KV blocks after any of it."""

from __future__ import annotations

import pytest
import torch

from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.sampling_params import SamplingParams
from tests.utils import assert_no_leak, hf_greedy, load_hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_engine(model_dir: str, **kwargs) -> LLMEngine:
    kwargs.setdefault("kv_cache_memory", 4 * 2**20)
    kwargs.setdefault("dtype", "float32")  # compared with fp32 transformers
    return LLMEngine(EngineArgs(model=model_dir, **kwargs))


def run_all(engine: LLMEngine) -> dict:
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def record_schedules(engine: LLMEngine) -> list:
    seen = []
    schedule = engine.scheduler.schedule

    def wrapped():
        out = schedule()
        seen.append(out)
        return out

    engine.scheduler.schedule = wrapped
    return seen


def prompts(n: int, length: int = 20, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(length + 3 * i)] for i in range(n)]


def test_greedy_matches_transformers_batched_and_alone(tiny_llama_dir):
    hf = load_hf_model(tiny_llama_dir)
    engine = make_engine(tiny_llama_dir)
    ps = prompts(4)
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, GREEDY)
    batched = run_all(engine)
    for i, p in enumerate(ps):
        engine.add_request(f"alone{i}", p, GREEDY)
        alone = run_all(engine)[f"alone{i}"]
        assert alone.outputs[0].token_ids == batched[str(i)].outputs[0].token_ids
        assert alone.outputs[0].token_ids == hf_greedy(hf, p, 12)
    assert_no_leak(engine)


def test_continuous_batching_short_request_overtakes_long_one(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, max_num_seqs=2)
    engine.add_request("long", prompts(1)[0], SamplingParams(max_tokens=60, ignore_eos=True))
    engine.step()
    engine.add_request(
        "short", prompts(1, seed=1)[0], SamplingParams(max_tokens=5, ignore_eos=True)
    )
    finished_at, long_tokens_when_short_done = {}, None
    while engine.has_unfinished_requests():
        outs = {o.request_id: o for o in engine.step()}
        for out in outs.values():
            if out.finished:
                finished_at[out.request_id] = engine.num_steps
        if "short" in outs and outs["short"].finished:
            long_tokens_when_short_done = len(outs["long"].outputs[0].token_ids)
            assert not outs["long"].finished  # the long one is still decoding
    assert long_tokens_when_short_done is not None and long_tokens_when_short_done < 60
    assert finished_at["short"] < finished_at["long"]
    assert finished_at["short"] <= 1 + 5 + 1  # admitted at once, not after the long one
    assert_no_leak(engine)


def test_max_num_seqs_and_token_budget_are_respected(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, max_num_seqs=3, max_num_batched_tokens=40)
    for i, p in enumerate(prompts(6, length=30)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        out = engine.scheduler.schedule()
        assert len(engine.scheduler.running) <= 3
        assert out.total_num_scheduled_tokens <= 40
        runner_out = engine.runner.execute_model(out)
        engine.scheduler.update_from_output(out, runner_out)
    assert_no_leak(engine)


def test_prefix_cache_skips_shared_system_prompt(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, block_size=16)
    system = prompts(1, length=200, seed=5)[0]
    a, b = system + [10, 11, 12], system + [20, 21]
    engine.add_request("a", a, GREEDY)
    out_a = run_all(engine)["a"]
    assert out_a.num_cached_tokens == 0
    computed_before = engine.scheduler.kv_cache_manager.prefix_cache_stats.hits
    engine.add_request("b", b, GREEDY)
    out_b = run_all(engine)["b"]
    assert out_b.num_cached_tokens == 192  # 12 full blocks of the 200-token system prompt
    assert engine.scheduler.kv_cache_manager.prefix_cache_stats.hits - computed_before == 192
    # same answer as an engine without prefix caching
    cold = make_engine(tiny_llama_dir, enable_prefix_caching=False)
    cold.add_request("b", b, GREEDY)
    assert run_all(cold)["b"].outputs[0].token_ids == out_b.outputs[0].token_ids
    assert_no_leak(engine)
    assert_no_leak(cold)


def test_counts_computed_prompt_tokens(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, block_size=16)
    system = prompts(1, length=200, seed=5)[0]
    schedules = record_schedules(engine)
    computed = []
    for suffix in ([1, 2], [3, 4]):
        engine.add_request(str(suffix), system + suffix, GREEDY)
        run_all(engine)
        computed.append(schedules[-GREEDY.max_tokens].total_num_scheduled_tokens)
    assert computed == [202, 202 - 192]


def test_preemption_by_recompute_keeps_greedy_output(tiny_llama_dir):
    ps = prompts(6, length=24)
    ref_engine = make_engine(tiny_llama_dir)
    for i, p in enumerate(ps):
        ref_engine.add_request(
            str(i), p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        )
    ref = run_all(ref_engine)
    # 20 blocks of 4 tokens: 6 requests growing to ~64+ tokens each cannot all fit
    engine = make_engine(tiny_llama_dir, num_kv_blocks=20, block_size=4, max_model_len=80)
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    got = run_all(engine)
    assert engine.scheduler.num_preemptions_total > 0
    for i in range(len(ps)):
        assert got[str(i)].outputs[0].token_ids == ref[str(i)].outputs[0].token_ids
    assert_no_leak(engine)


def test_request_that_can_never_fit_is_rejected(tiny_llama_dir):
    with pytest.raises(ValueError, match="max_model_len"):
        make_engine(tiny_llama_dir, num_kv_blocks=4, block_size=4, max_model_len=64)
    engine = make_engine(tiny_llama_dir, num_kv_blocks=16, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("x", list(range(3, 70)), GREEDY)
    engine.add_request("ok", list(range(3, 30)), GREEDY)
    assert run_all(engine)["ok"].finished
    assert_no_leak(engine)


def test_n_samples_share_prompt_blocks_and_seeds_reproduce(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, block_size=4)
    p = prompts(1, length=40)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    engine.add_request("x", p, params)
    schedules = record_schedules(engine)
    out = run_all(engine)["x"]
    # sample 0 computes the prompt; samples 1, 2 hit its (same-step) blocks
    assert list(schedules[0].num_scheduled_tokens.values()) == [40, 4, 4]
    texts = [tuple(c.token_ids) for c in out.outputs]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len(set(texts)) > 1  # independent samples
    # the same seed gives the same samples, alone or in a busy batch
    engine.add_request("y", p, params)
    for i, q in enumerate(prompts(3, seed=9)):
        engine.add_request(f"noise{i}", q, SamplingParams(temperature=1.0, max_tokens=10))
    again = run_all(engine)["y"]
    assert [tuple(c.token_ids) for c in again.outputs] == texts
    assert_no_leak(engine)


def test_stop_token_ids_min_tokens_and_eos(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    p = prompts(1)[0]
    engine.add_request("free", p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    free = run_all(engine)["free"].outputs[0].token_ids
    stop_tok = free[5]
    first = free.index(stop_tok)
    engine.add_request(
        "s", p, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_tok])
    )
    out = run_all(engine)["s"].outputs[0]
    assert out.token_ids == free[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    # min_tokens bans stop tokens until reached
    engine.add_request(
        "m",
        p,
        SamplingParams(
            temperature=0, max_tokens=30, stop_token_ids=[stop_tok], min_tokens=first + 2
        ),
    )
    out = run_all(engine)["m"].outputs[0]
    assert stop_tok not in out.token_ids[: first + 2]
    engine.add_request("len", p, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    out = run_all(engine)["len"].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    assert_no_leak(engine)


def test_stop_strings_trim_output(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    p = prompts(1)[0]
    engine.add_request("free", p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    text = run_all(engine)["free"].outputs[0].text
    assert len(text) > 6
    stop = text[3:5]
    engine.add_request(
        "s", p, SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True)
    )
    out = run_all(engine)["s"].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    engine.add_request(
        "inc",
        p,
        SamplingParams(
            temperature=0,
            max_tokens=30,
            stop=[stop],
            include_stop_str_in_output=True,
            ignore_eos=True,
        ),
    )
    out = run_all(engine)["inc"].outputs[0]
    assert out.text == text[: text.index(stop) + len(stop)]
    assert_no_leak(engine)


def test_abort_frees_blocks_and_others_continue(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    ps = prompts(3)
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()
    engine.step()
    aborted = engine.abort_request("1")
    assert aborted[0].outputs[0].finish_reason == "abort"
    done = run_all(engine)
    assert set(done) == {"0", "2"} and all(len(o.outputs[0].token_ids) == 20 for o in done.values())
    engine.add_request("w", ps[0], GREEDY)
    engine.abort_request("w")  # aborted while still waiting
    assert_no_leak(engine)


@pytest.mark.parametrize(
    "prompt,params,match",
    [
        ("", SamplingParams(), "empty"),
        ([], SamplingParams(), "empty"),
        ([5] * 600, SamplingParams(), "max_model_len"),
        ([1, 2, 99999], SamplingParams(), "out of range"),
        (3.5, SamplingParams(), "prompt must be"),
        ([5, 6], SamplingParams(stop_token_ids=[400]), "stop_token_ids"),
    ],
)
def test_bad_prompts_raise_and_engine_keeps_serving(tiny_llama_dir, prompt, params, match):
    engine = make_engine(tiny_llama_dir)
    engine.add_request("good", prompts(1)[0], GREEDY)
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", prompt, params)
    assert run_all(engine)["good"].finished
    assert_no_leak(engine)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"seed": 2**70}, "seed"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        # NaN passes every `<` check, so each float field is tested for it; absurd magnitudes
        # (1e-300 would overflow the logits to inf) are out of range.
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"min_p": float("nan")}, "min_p"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"frequency_penalty": float("-inf")}, "frequency_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_duplicate_request_id_rejected(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    engine.add_request("a", prompts(1)[0], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", prompts(1)[0], GREEDY)
    run_all(engine)
    assert_no_leak(engine)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtypes_stay_close_to_fp32(tiny_llama_dir, dtype):
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    p = prompts(1)[0]
    ref = make_engine(tiny_llama_dir)
    ref.add_request("r", p, params)
    want = run_all(ref)["r"].outputs[0].logprobs[0]
    low = make_engine(tiny_llama_dir, dtype=dtype)
    low.add_request("r", p, params)
    got = run_all(low)["r"].outputs[0].logprobs[0]
    for token_id, lp in want.items():
        assert token_id in got and abs(got[token_id].logprob - lp.logprob) < 0.1
    assert_no_leak(low)


def batch_with_shared_prefix() -> list[list[int]]:
    """Six prompts plus two sharing a 40-token prefix (a prefix-cache hit)."""
    shared = prompts(1, length=40)[0]
    return prompts(6) + [shared + [5, 6], shared + [7, 8]]


def run_leak_free(engine: LLMEngine, ps: list[list[int]], params: SamplingParams) -> dict:
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, params)
    outs = run_all(engine)
    assert_no_leak(engine)
    return outs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_kv_cache_holds_more_tokens_and_frees_every_block(tiny_llama_dir, dtype):
    """--kv-cache-dtype int8: the same memory budget holds more blocks (1 byte per value plus
    a 4-byte scale per token and head, against 2 or 4 bytes); batched and prefix-cached
    requests still start with the fp cache's greedy tokens, and free every block."""
    fp = make_engine(tiny_llama_dir, dtype=dtype)
    q8 = make_engine(tiny_llama_dir, dtype=dtype, kv_cache_dtype="int8")
    head_dim = 64 // 4
    elt = 4 if dtype == "float32" else 2
    ratio = q8.kv_cache_manager.num_blocks / fp.kv_cache_manager.num_blocks
    assert ratio == pytest.approx(head_dim * elt / (head_dim + 4), rel=0.01)
    ps = batch_with_shared_prefix()
    outs = {"fp": run_leak_free(fp, ps, GREEDY), "q8": run_leak_free(q8, ps, GREEDY)}
    same = sum(
        outs["fp"][k].outputs[0].token_ids[:4] == outs["q8"][k].outputs[0].token_ids[:4]
        for k in outs["fp"]
    )
    assert same >= len(ps) - 1


def test_bf16_kv_cache_under_fp32_model(tiny_llama_dir):
    """--kv-cache-dtype bfloat16 with dtype float32: twice the blocks in the same budget (2 bytes
    per value instead of 4), fp32 logits close to the fp32 cache's, the same greedy tokens
    (batched, prefix-cached), every block freed."""
    fp = make_engine(tiny_llama_dir)
    b16 = make_engine(tiny_llama_dir, kv_cache_dtype="bfloat16")
    assert b16.runner.kv_caches[0][0].dtype == torch.bfloat16
    assert b16.kv_cache_manager.num_blocks == 2 * fp.kv_cache_manager.num_blocks
    ps = batch_with_shared_prefix()
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=1)
    outs = {"fp": run_leak_free(fp, ps, params), "b16": run_leak_free(b16, ps, params)}
    for k, out in outs["fp"].items():
        got = outs["b16"][k].outputs[0]
        assert got.token_ids == out.outputs[0].token_ids
        for want_lp, got_lp in zip(out.outputs[0].logprobs, got.logprobs):
            tok = next(iter(want_lp))
            assert abs(got_lp[tok].logprob - want_lp[tok].logprob) < 0.02


def test_bf16_kv_cache_needs_fp32_or_bf16_model(tiny_llama_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype='bfloat16'"):
        make_engine(tiny_llama_dir, dtype="float16", kv_cache_dtype="bfloat16")


def test_kv_cache_dtype_is_validated():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineArgs(kv_cache_dtype="fp4")


def test_int8_weight_quantization_decodes_close_to_full_precision(tiny_llama_dir):
    """--quantization int8: one request decodes (1-row steps) through the int8 weights and still
    starts with the full-precision greedy tokens; a batch of 6 prefills with the full ones."""
    fp = make_engine(tiny_llama_dir)
    w8 = make_engine(tiny_llama_dir, quantization="int8")
    runner_linears = [
        m for m in w8.runner.model.modules() if getattr(m, "int8_weight", None) is not None
    ]
    assert runner_linears, "no int8 weights were made"
    p = prompts(1)[0]
    for engine in (fp, w8):
        engine.add_request("r", p, GREEDY)
    a = run_all(fp)["r"].outputs[0].token_ids
    b = run_all(w8)["r"].outputs[0].token_ids
    assert a[:4] == b[:4], (a, b)
    assert_no_leak(w8)
    with pytest.raises(ValueError, match="quantization"):
        EngineArgs(quantization="int4")
