"""A pool of fixed-size KV blocks with reference counts and a prefix-hash index. No torch here: the pool
deals in block ids; the runner owns the tensors they index.

Invariants:
- a block is either in use (ref_cnt > 0) or in `free` (ref_cnt == 0), never both;
- a free block may still hold a cached full prefix block (its hash stays in `_cached` until the block is
  handed out again), so freeing never discards reusable KV - eviction happens lazily, in the order of the
  eviction policy (kv_cache/eviction.py; LRU by default);
- block 0 is never handed out: it is the null block that padded block-table entries point at.
"""

from __future__ import annotations

from dataclasses import dataclass

from turboinfer.kv_cache.eviction import LRUEviction


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set once the block is full and its tokens are final


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True, eviction=None) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks = eviction if eviction is not None else LRUEviction()  # free ids in reuse order
        for i in range(1, num_blocks):
            self.free_blocks.push(i)
        self._cached: dict[int, int] = {}  # block_hash -> block_id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_blocks):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self.free_blocks)} free")  # callers check first
        ids = []
        for _ in range(n):
            block_id = self.free_blocks.pop()
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
                self.free_blocks.push(block_id)

    def cached_block(self, block_hash: int) -> int | None:
        """The block holding this prefix hash, or None (always None with prefix caching off)."""
        return self._cached.get(block_hash) if self.enable_prefix_caching else None

    def num_cached_prefix(self, block_hashes: list[int]) -> int:
        """Length of the longest run of these consecutive prefix hashes that is cached."""
        n = 0
        while n < len(block_hashes) and self.cached_block(block_hashes[n]) is not None:
            n += 1
        return n

    def take(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks found by lookup (reviving free ones)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                self.free_blocks.remove(block_id)
            block.ref_cnt += 1

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
