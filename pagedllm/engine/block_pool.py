"""BlockPool: the physical KV blocks, their reference counts, the LRU free queue and the
prefix-cache index.

    free queue (LRU, evict from the left)        cached_blocks (hash -> block)
    [b7, b3, b9, ...]  <- freed blocks appended   blocks whose content is known, reusable
                                                  while free until popped for another use

A block is "free" when no request holds it (ref_cnt == 0). A free block may still carry a
hash: a later request with the same prefix can revive it; it loses its hash only when the free
queue hands it out for new content.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

BlockHash = bytes


class BlockKey(NamedTuple):
    """NOTE: the token ids are kept with the hash so a hash collision never returns wrong KV."""

    block_hash: BlockHash
    token_ids: tuple[int, ...]


def hash_block(parent_hash: BlockHash | None, token_ids: tuple[int, ...]) -> BlockHash:
    """Chained hash: a block's identity covers every token before it."""
    h = hashlib.blake2b(parent_hash or b"", digest_size=16)
    h.update(repr(token_ids).encode())
    return h.digest()


@dataclass
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    key: BlockKey | None = field(default=None)

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt}, cached={self.key is not None})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # OrderedDict as an O(1) LRU queue: popitem(last=False) evicts, pop(id) revives.
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_cached_free_blocks(self) -> int:
        return sum(1 for b in self.free_queue.values() if b.key is not None)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, key: BlockKey) -> KVCacheBlock | None:
        block = self.cached_blocks.get(key.block_hash)
        if block is None or block.key != key:
            return None
        return block

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Take a reference on prefix-cache hits, reviving free ones."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def allocate(self, num_blocks: int) -> list[KVCacheBlock]:
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot allocate {num_blocks} blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(num_blocks):
            _, block = self.free_queue.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks: list[KVCacheBlock]) -> None:
        """Drop one reference each; pass blocks tail-first so prefix heads are evicted last."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"double free of {block}"
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block

    def cache_block(self, block: KVCacheBlock, key: BlockKey) -> None:
        if not self.enable_caching or block.key is not None:
            return
        if key.block_hash in self.cached_blocks:
            return  # an identical block is already cached; this one stays anonymous
        block.key = key
        self.cached_blocks[key.block_hash] = block

    def _evict(self, block: KVCacheBlock) -> None:
        if block.key is not None:
            if self.cached_blocks.get(block.key.block_hash) is block:
                del self.cached_blocks[block.key.block_hash]
            block.key = None

    def reset_prefix_cache(self) -> bool:
        if any(b.ref_cnt for b in self.blocks):
            return False
        for block in self.blocks:
            block.key = None
        self.cached_blocks.clear()
        return True
