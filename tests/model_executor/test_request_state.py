"""The model runner's persistent request state (model_executor/request_state.py): a request's
whole state arrives once, then only deltas; block-table rows are reused and grow; and the
scheduler sends exactly the tokens and blocks the runner lacks (end to end through preemption
and prefix hits, outputs unchanged)."""

from __future__ import annotations

from pagedllm.model_executor.request_state import BlockTable, RequestStates
from pagedllm.sampling_params import SamplingParams
from pagedllm.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from tests.engine.test_llm_engine import make_engine, prompts, record_schedules, run_all
from tests.utils import assert_no_leak


def test_deltas_build_the_same_rows_as_the_whole_state():
    states = RequestStates()
    params = SamplingParams()
    step = states.update(
        SchedulerOutput(
            new_requests=[NewRequestData("a", [1, 2, 3, 4, 5], [], params, [7, 8], 0)],
            num_scheduled_tokens={"a": 5},
        )
    )
    assert [(s.req_id, s.start_pos, s.num_tokens, s.needs_sample) for s in step] == [
        ("a", 0, 5, True)
    ]
    assert step[0].token_ids == [1, 2, 3, 4, 5]
    # next step: the sampled token 9 and a new block arrive as a delta, with two drafts
    step = states.update(
        SchedulerOutput(
            cached_requests=[CachedRequestData("a", [9], [11], 5)],
            num_scheduled_tokens={"a": 3},
            spec_token_ids={"a": [4, 4]},
        )
    )
    s = step[0]
    assert (s.start_pos, s.token_ids, s.needs_sample) == (5, [9, 4, 4], True)
    assert s.output_token_ids == [9] and s.prompt_token_ids == [1, 2, 3, 4, 5]
    row = s.state.row
    assert states.block_table.table[row, :3].tolist() == [7, 8, 11]
    # a finished request's row is handed to the next new one
    states.update(
        SchedulerOutput(
            new_requests=[NewRequestData("b", [5], [6, 6], params, [3], 0)],
            num_scheduled_tokens={"b": 3},
            finished_req_ids={"a"},
        )
    )
    assert "a" not in states.states and states.states["b"].row == row
    assert states.states["b"].output_token_ids == [6, 6]  # resumed after a preemption


def test_block_table_grows_in_rows_and_blocks():
    table = BlockTable(rows=2, blocks=2)
    rows = [table.add_row() for _ in range(5)]
    assert sorted(rows) == list(range(5)) and table.table.shape[0] >= 5
    table.append(rows[4], 0, [1, 2, 3, 4, 5])
    assert table.table[rows[4], :5].tolist() == [1, 2, 3, 4, 5]
    table.append(rows[4], 5, [6])
    assert table.table[rows[4], :6].tolist() == [1, 2, 3, 4, 5, 6]


def test_scheduler_sends_each_token_and_block_once(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, num_kv_blocks=20, block_size=4, max_model_len=80)
    schedules = record_schedules(engine)
    ps = prompts(6, length=24)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = make_engine(tiny_llama_dir)
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, params)
        ref.add_request(str(i), p, params)
    got, want = run_all(engine), run_all(ref)
    assert engine.scheduler.num_preemptions_total > 0  # resumed requests arrive whole again
    for rid in want:
        assert got[rid].outputs[0].token_ids == want[rid].outputs[0].token_ids
    # replaying the deltas gives each request exactly its tokens: prompt + outputs
    seen: dict[str, list[int]] = {}
    for out in schedules:
        for rid in (*out.finished_req_ids, *out.preempted_req_ids):
            seen.pop(rid, None)
        for new in out.new_requests:
            seen[new.req_id] = [*new.prompt_token_ids, *new.output_token_ids]
        for cached in out.cached_requests:
            seen[cached.req_id].extend(cached.new_token_ids)
            assert len(cached.new_token_ids) <= 5  # a sampled token, or accepted drafts + 1
    for rid, tokens in seen.items():
        full = ps[int(rid)] + list(got[rid].outputs[0].token_ids)
        assert full[: len(tokens)] == tokens
    # the last finished requests leave the runner with the next step's message
    engine.step()
    assert len(engine.runner.requests) == 0
    assert_no_leak(engine)
