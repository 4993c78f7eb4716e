"""KVCacheManager: which physical blocks hold each request's KV (the block table), with prefix
caching. It owns the BlockPool and never touches a tensor.

    request tokens   [t0 .. t15][t16 .. t31][t32 .. t40]      block_size = 16
    block table      [   b4    ][    b9    ][    b2   ]       logical block i -> physical block
    hashes           [   h0    ][ h1(h0,..)]  (partial block: no hash yet)

A model whose every layer attends only to its last ``sliding_window`` keys (Mistral) never
reads a block again once the next token to compute is past it by a window: such leading
blocks go back to the pool before each step's allocation (their prefix-cache entries stay
until the pool hands them out), so a sequence holds about window + one step of tokens however
long it grows. Their places in the table keep the old ids: attention never reads a position
outside a query's window (the decode kernel starts at the window; the windowed paths mask it).
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.engine.block_pool import BlockKey, BlockPool, KVCacheBlock, hash_block
from pagedllm.engine.request import Request


@dataclass
class PrefixCacheStats:
    """Token counts, so hit rate = hits / queries (vLLM's prefix_cache_* metrics)."""

    queries: int = 0
    hits: int = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        sliding_window: int | None = None,
        max_step_tokens: int | None = None,
    ) -> None:
        """``sliding_window``: every layer's window (None: some layer reads the whole
        sequence); ``max_step_tokens``: the most tokens a request computes in one step (with a
        window, what a sequence holds beyond it)."""
        if sliding_window is not None and not max_step_tokens:
            raise ValueError("a sliding-window KV cache needs max_step_tokens")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.max_step_tokens = max_step_tokens
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}
        # Sliding window: how many leading blocks of each request went back to the pool.
        self.num_freed_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(req_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of full blocks. At least one token is always left to compute,
        because the model must run on the last token to produce the next one."""
        if not self.enable_caching:
            return [], 0
        keys = self._block_keys(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for key in keys[:max_hit_blocks]:
            block = self.pool.get_cached_block(key)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        self.prefix_cache_stats.queries += request.num_tokens
        self.prefix_cache_stats.hits += num_hit_tokens
        return hits, num_hit_tokens

    def can_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of this length could ever fit, with the whole pool to itself."""
        return self.max_blocks_held(num_tokens) <= self.pool.num_blocks

    def max_blocks_held(self, num_tokens: int) -> int:
        """The most blocks a sequence of ``num_tokens`` holds at once: all of them, or with a
        sliding window the window's (less a token: a query sees itself) plus a step's, plus
        one for where they straddle blocks."""
        if self.sliding_window is None:
            return cdiv(num_tokens, self.block_size)
        held = min(num_tokens, self.sliding_window - 1 + self.max_step_tokens)
        return min(cdiv(num_tokens, self.block_size), cdiv(held, self.block_size) + 1)

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[KVCacheBlock] | None:
        """Make room for ``num_new_tokens`` more tokens of KV; None (and no change) if the pool
        cannot provide the blocks."""
        new_computed_blocks = new_computed_blocks or []
        req_blocks = self.req_to_blocks.setdefault(request.req_id, [])
        if self.sliding_window is not None and req_blocks:
            self._free_outside_window(request, req_blocks)
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_needed = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = max(0, num_needed - len(req_blocks) - len(new_computed_blocks))
        # Hits that sit in the free queue stop being allocatable once we take them.
        num_revived = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_revived:
            if not req_blocks:
                del self.req_to_blocks[request.req_id]
            return None
        self.pool.touch(new_computed_blocks)
        req_blocks.extend(new_computed_blocks)
        new_blocks = self.pool.allocate(num_new_blocks)
        req_blocks.extend(new_blocks)
        if self.enable_caching:
            # Draft tokens (speculative decoding) may be rejected: index real tokens only.
            num_real = min(num_computed + num_new_tokens, request.num_tokens)
            self._cache_full_blocks(request, req_blocks, num_real)
        return new_blocks

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.req_id, [])
        self.num_cached_blocks.pop(request.req_id, None)
        freed = self.num_freed_blocks.pop(request.req_id, 0)
        self.pool.free(list(reversed(blocks[freed:])))

    def num_held_blocks(self, req_id: str) -> int:
        return len(self.req_to_blocks.get(req_id, ())) - self.num_freed_blocks.get(req_id, 0)

    def _free_outside_window(self, request: Request, req_blocks: list[KVCacheBlock]) -> None:
        """Give back the leading blocks no query from the next token on can see: the first
        query of the step (position num_computed) reads from num_computed - window + 1."""
        first_seen = request.num_computed_tokens - self.sliding_window + 1
        outside = min(max(0, first_seen // self.block_size), len(req_blocks))
        done = self.num_freed_blocks.get(request.req_id, 0)
        if outside <= done:
            return
        # Oldest first to the free queue's tail, so the most recent stay cached longest.
        self.pool.free(req_blocks[done:outside])
        self.num_freed_blocks[request.req_id] = outside

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def _cache_full_blocks(
        self, request: Request, req_blocks: list[KVCacheBlock], num_tokens: int
    ) -> None:
        """Index the blocks that will be full once this step's tokens are written.

        NOTE: a block is indexed before the forward pass that fills it runs. That is safe because
        every layer writes the whole batch's K/V before any attention reads, so a request that
        hits such a block in the same step reads what its sibling just wrote.
        """
        num_full = num_tokens // self.block_size
        start = self.num_cached_blocks.get(request.req_id, 0)
        if num_full <= start:
            return
        keys = self._block_keys(request)
        for i in range(start, num_full):
            self.pool.cache_block(req_blocks[i], keys[i])
        self.num_cached_blocks[request.req_id] = num_full

    def _block_keys(self, request: Request) -> list[BlockKey]:
        """Extend the request's chained block hashes to all its full blocks."""
        keys = request.block_hashes
        bs = self.block_size
        tokens = request.all_token_ids
        for i in range(len(keys), len(tokens) // bs):
            parent = keys[i - 1].block_hash if i > 0 else request.cache_salt
            block_tokens = tuple(tokens[i * bs : (i + 1) * bs])
            keys.append(BlockKey(hash_block(parent, block_tokens), block_tokens))
        return keys


class NoKVCacheManager:
    """An encoder's stand-in for the KVCacheManager: it caches nothing, so every allocation
    succeeds with no blocks and the scheduler's token budget and seats alone bound a step."""

    enable_caching = False
    num_blocks = 0
    num_free_blocks = 0

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.prefix_cache_stats = PrefixCacheStats()

    def usage(self) -> float:
        return 0.0

    def block_ids(self, req_id: str) -> list[int]:
        return []

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        return [], 0

    def can_fit(self, num_tokens: int) -> bool:
        return True

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[KVCacheBlock]:
        return []

    def free(self, request: Request) -> None:
        pass

    def reset_prefix_cache(self) -> bool:
        return True
