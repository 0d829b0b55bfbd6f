"""A pool of fixed-size KV blocks with reference counts and a prefix-hash index. No torch here: the pool
deals in block ids; the runner owns the tensors they index.

Invariants:
- a block is either in use (ref_cnt > 0) or in `_free` (ref_cnt == 0), never both;
- a free block may still hold a cached full prefix block (its hash stays in `_cached` until the block is
  handed out again), so freeing never discards reusable KV - eviction happens lazily, LRU order;
- block 0 is never handed out: it is the null block that padded block-table entries point at.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set once the block is full and its tokens are final


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # LRU order: oldest-freed first. dict keys give O(1) removal when a cached block is revived.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._cached: dict[int, int] = {}  # block_hash -> block_id
        self.num_cache_queries = 0  # blocks looked up (for the prefix-cache hit rate)
        self.num_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")  # callers check first
        ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict the cached prefix this block held
                if self._cached.get(block.block_hash) == block_id:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            ids.append(block_id)
        return ids

    def free(self, block_ids: list[int]) -> None:
        # Freed in reverse so a request's tail blocks are evicted before its head: heads are likelier shared.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block_id} freed twice"
            if block.ref_cnt == 0:
                self._free[block_id] = None

    def lookup(self, block_hashes: list[int]) -> list[int]:
        """Longest run of cached blocks for these consecutive prefix hashes; takes a reference on each."""
        if not self.enable_prefix_caching:
            return []
        hit: list[int] = []
        for h in block_hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        self.num_cache_queries += len(block_hashes)
        self.num_cache_hits += len(hit)
        for block_id in hit:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1
        return hit

    def cache_full_block(self, block_id: int, block_hash: int) -> None:
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        # If an identical block is already cached keep the older one as the index entry; this one still
        # serves its owner and is simply not findable.
        self._cached.setdefault(block_hash, block_id)

    def reset_prefix_cache(self) -> None:
        for block_id in self._cached.values():
            self.blocks[block_id].block_hash = None
        self._cached.clear()

    def hit_rate(self) -> float:
        return self.num_cache_hits / self.num_cache_queries if self.num_cache_queries else 0.0
