"""Block pool and KV cache manager: exact block ids, prefix hits, LRU eviction, no leaks."""

from __future__ import annotations

import pytest

from pagedllm.engine.block_pool import BlockPool
from pagedllm.engine.kv_cache_manager import KVCacheManager
from pagedllm.engine.request import Request
from pagedllm.sampling_params import SamplingParams


def _req(req_id: str, tokens: list[int]) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=8))


def test_allocate_in_order_and_free_tail_first():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    r = _req("a", list(range(10)))
    new = kv.allocate_slots(r, 10)
    assert [b.block_id for b in new] == [0, 1, 2]
    assert kv.block_ids("a") == [0, 1, 2]
    r.num_computed_tokens = 10
    r.append_output_token(99)
    r.append_output_token(98)  # 12 tokens still fit in 3 blocks
    assert kv.allocate_slots(r, 2) == []
    r.num_computed_tokens = 12
    assert [b.block_id for b in kv.allocate_slots(r, 1)] == [3]
    kv.free(r)
    assert kv.num_free_blocks == 8
    # freed tail-first: the free queue now ends ... 3, 2, 1, 0
    assert list(kv.pool.free_queue)[-4:] == [3, 2, 1, 0]


def test_allocation_fails_without_side_effects():
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_caching=False)
    r = _req("a", list(range(9)))
    assert kv.allocate_slots(r, 9) is None
    assert kv.num_free_blocks == 2 and "a" not in kv.req_to_blocks


def test_prefix_hit_reuses_exact_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = _req("a", list(range(10)))
    assert kv.get_computed_blocks(a) == ([], 0)
    kv.allocate_slots(a, 10)  # blocks 0,1 full (cached), block 2 partial
    b = _req("b", list(range(8)) + [50, 51, 52])
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and n == 8
    new = kv.allocate_slots(b, 3, hits)
    assert [x.block_id for x in new] == [3]
    assert kv.block_ids("b") == [0, 1, 3]
    assert kv.pool.blocks[0].ref_cnt == 2
    assert kv.prefix_cache_stats.queries == 10 + 11 and kv.prefix_cache_stats.hits == 8


def test_full_prompt_hit_leaves_last_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = _req("a", list(range(8)))
    kv.allocate_slots(a, 8)
    b = _req("b", list(range(8)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 4 and [h.block_id for h in hits] == [0]


def test_freed_cached_blocks_revive_until_evicted():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = _req("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)  # blocks 0,1 cached; 2 partial
    kv.free(a)
    assert kv.num_free_blocks == 4 and kv.pool.num_cached_free_blocks == 2
    b = _req("b", [1, 2, 3, 4, 9])
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and n == 4
    kv.allocate_slots(b, 1, hits)
    assert kv.block_ids("b") == [0, 1, 3]  # block 3 was first in LRU order among uncached-free
    kv.free(b)
    # a request with different tokens evicts in LRU order: 2 was freed earliest
    c = _req("c", [7, 7, 7, 7, 7, 7, 7])
    kv.allocate_slots(c, 7)
    assert kv.block_ids("c") == [2, 3, 1, 0]
    assert kv.pool.cached_blocks == {} or all(
        blk.block_id in (2, 3, 1, 0) for blk in kv.pool.cached_blocks.values()
    )
    d = _req("d", [1, 2, 3, 4, 5])
    assert kv.get_computed_blocks(d) == ([], 0)  # evicted: no stale hit


def test_revived_hits_count_against_free_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = _req("a", [1, 2, 3, 4])
    kv.allocate_slots(a, 4)
    kv.free(a)
    b = _req("b", [1, 2, 3, 4, 5, 6, 7, 8])
    hits, n = kv.get_computed_blocks(b)
    assert n == 4
    # needs 4 blocks total: 2 hits (free-queue blocks) + 2 new, but only 1 other block exists
    assert kv.allocate_slots(b, 4, hits) is None
    assert kv.num_free_blocks == 3 and all(x.ref_cnt == 0 for x in kv.pool.blocks)


def test_hash_collision_never_returns_wrong_blocks():
    pool = BlockPool(2)
    from pagedllm.engine.block_pool import BlockKey

    pool.cache_block(pool.blocks[0], BlockKey(b"same", (1, 2)))
    assert pool.get_cached_block(BlockKey(b"same", (3, 4))) is None
    assert pool.get_cached_block(BlockKey(b"same", (1, 2))) is pool.blocks[0]


def test_double_free_is_caught():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(AssertionError):
        pool.free(blocks)


def test_sliding_window_gives_back_blocks_behind_the_window():
    """Window 6, blocks of 4: before a step starting at token c, blocks wholly before
    c - 5 go back to the pool (still cached), so the request holds ~window + a step."""
    kv = KVCacheManager(num_blocks=6, block_size=4, sliding_window=6, max_step_tokens=4)
    r = _req("a", list(range(40)))
    assert kv.max_blocks_held(10_000) == 4  # cdiv(5 + 4, 4) + 1
    assert kv.can_fit(10_000) and not KVCacheManager(6, 4).can_fit(10_000)
    held = []
    for c in range(0, 40, 4):  # a 40-token prompt in chunks of 4: never more than 4 blocks
        r.num_computed_tokens = c
        assert kv.allocate_slots(r, 4) is not None
        held.append(kv.num_held_blocks("a"))
        # every block a query of this step may read is held: from c - 5 on
        first_needed = max(0, c - 5) // 4
        assert kv.num_freed_blocks.get("a", 0) <= first_needed
    assert max(held) <= 4 and kv.num_free_blocks == 6 - held[-1]
    assert len(kv.block_ids("a")) == 10  # the table keeps its places (old ids)
    # a freed block keeps its prefix-cache entry until the pool hands it out again
    freed = kv.block_ids("a")[: kv.num_freed_blocks["a"]]
    waiting = [i for i in freed if i in kv.pool.free_queue]
    assert waiting and all(kv.pool.blocks[i].key is not None for i in waiting)
    kv.free(r)  # the freed leading blocks are not freed twice
    assert kv.num_free_blocks == 6 and all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_sliding_window_decodes_hold_a_constant_number_of_blocks():
    kv = KVCacheManager(num_blocks=5, block_size=2, sliding_window=3, max_step_tokens=2)
    r = _req("a", [1, 2, 3])
    assert kv.allocate_slots(r, 3) is not None
    r.num_computed_tokens = 3
    for t in range(100):  # decode 100 tokens one at a time through a 5-block pool
        r.append_output_token(t)
        assert kv.allocate_slots(r, 1) is not None, t
        r.num_computed_tokens += 1
        assert kv.num_held_blocks("a") <= kv.max_blocks_held(r.num_tokens) <= 4
    kv.free(r)
    assert kv.num_free_blocks == 5
