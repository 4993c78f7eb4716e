"""Admission fairness: one API call fanned out into many sequences (one group) cannot keep a
small request waiting behind it, and never holds every seat."""

from __future__ import annotations

from pagedllm.config import SchedulerConfig
from pagedllm.engine.kv_cache_manager import KVCacheManager
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.waiting_queue import max_seats_per_group
from pagedllm.sampling_params import SamplingParams


def make_scheduler(max_num_seqs: int) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64, max_model_len=64)
    return Scheduler(config, KVCacheManager(num_blocks=256, block_size=4, enable_caching=False))


def req(req_id: str, group: str | None = None) -> Request:
    return Request(req_id, [1, 2, 3], SamplingParams(max_tokens=4), group_id=group)


def admitted(scheduler: Scheduler) -> list[str]:
    """Run one schedule(); -> the requests it moved from waiting to running, in order."""
    before = {r.req_id for r in scheduler.running}
    scheduler.schedule()
    return [r.req_id for r in scheduler.running if r.req_id not in before]


def test_group_never_holds_every_seat():
    scheduler = make_scheduler(8)
    for i in range(20):
        scheduler.add_request(req(f"big-{i}", "big"))
    first = admitted(scheduler)
    assert len(first) == max_seats_per_group(8) == 6
    # A small request arriving later gets a reserved seat at once.
    scheduler.add_request(req("small"))
    assert admitted(scheduler) == ["small"]


def test_small_request_jumps_a_big_groups_backlog():
    scheduler = make_scheduler(8)
    for i in range(20):
        scheduler.add_request(req(f"big-{i}", "big"))
    scheduler.add_request(req("other-a"))
    scheduler.add_request(req("other-b"))
    # Turns go to the group holding the fewest seats: the small ones come second and third,
    # not after big's twenty.
    order = admitted(scheduler)
    assert order[:3] == ["big-0", "other-a", "other-b"]
    assert len(order) == 8


def test_freed_seat_goes_to_the_group_holding_fewest():
    scheduler = make_scheduler(4)
    for i in range(6):
        scheduler.add_request(req(f"a-{i}", "a"))
    assert admitted(scheduler) == ["a-0", "a-1", "a-2"]  # 3 of 4 seats: the cap
    for i in range(3):
        scheduler.add_request(req(f"b-{i}", "b"))
    assert admitted(scheduler) == ["b-0"]  # the free seat
    # a-0 finishes: b (one seat) holds fewer than a (two), so b gets the seat.
    scheduler.finish_requests(["a-0"], RequestStatus.FINISHED_ABORTED)
    assert admitted(scheduler) == ["b-1"]


def test_requests_without_a_group_are_first_come_first_served():
    scheduler = make_scheduler(2)
    for i in range(5):
        scheduler.add_request(req(f"r{i}"))
    assert admitted(scheduler) == ["r0", "r1"]
    scheduler.finish_requests(["r0", "r1"], RequestStatus.FINISHED_ABORTED)
    assert admitted(scheduler) == ["r2", "r3"]
    assert len(scheduler.waiting) == 1
