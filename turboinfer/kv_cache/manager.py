"""Per-request block bookkeeping over one block pool per KV cache group (kv_cache/spec.py): which blocks a request
owns in each group, which of its tokens come from a shared prefix, hashing of blocks as their tokens become final,
and freeing of blocks that slid out of a window (no torch).

A request has one block table per group. A sliding-window group's table keeps its length, but entries wholly
before the window of the request's next query point at the null block 0: their rows are never read again, so
their blocks go back to the pool (still findable by prefix hash until reused).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from turboinfer.kv_cache.block_pool import BlockPool
from turboinfer.kv_cache.spec import SLIDING, KVCacheGroup

NULL_BLOCK = 0


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    # Chained: a block's hash covers every token before it, so equal hashes mean equal prefixes.
    return hash((parent_hash, token_ids))


@dataclass
class _Tables:
    block_ids: list[list[int]]  # per group: the request's block table
    hashes: list[int] = field(default_factory=list)  # prefix hashes of its full, final blocks so far
    num_released: list[int] = field(default_factory=list)  # per group: leading entries given back (sliding)


class KVCacheManager:
    def __init__(self, groups: list[KVCacheGroup], block_size: int, enable_prefix_caching: bool = True,
                 eviction_factory=None) -> None:
        """groups: sized (num_blocks set); eviction_factory: () -> a free-block order per pool (default LRU)."""
        if not groups:
            raise ValueError("the KV cache needs at least one group of layers")
        self.groups = groups
        self.block_size = block_size
        self.pools = [BlockPool(g.num_blocks, enable_prefix_caching, eviction_factory() if eviction_factory else None)
                      for g in groups]
        self.enable_prefix_caching = enable_prefix_caching
        self._reqs: dict[str, _Tables] = {}
        self.num_cache_queries = 0  # blocks looked up (for the prefix-cache hit rate)
        self.num_cache_hits = 0

    # ---- pool-wide figures ----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return sum(p.num_free_blocks for p in self.pools)

    @property
    def num_usable_blocks(self) -> int:
        return sum(p.num_usable_blocks for p in self.pools)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def hit_rate(self) -> float:
        return self.num_cache_hits / self.num_cache_queries if self.num_cache_queries else 0.0

    def reset_prefix_cache(self) -> None:
        for p in self.pools:
            p.reset_prefix_cache()

    @property
    def num_requests(self) -> int:
        """Requests holding tables (blocks or prefix references)."""
        return len(self._reqs)

    def block_tables(self, request_id: str) -> list[list[int]]:
        return self._reqs[request_id].block_ids

    # ---- per request ----------------------------------------------------------------------------------
    def _window_start_block(self, g: KVCacheGroup, num_computed_tokens: int) -> int:
        """First block a query at row num_computed_tokens can still read in group g."""
        if g.spec.kind != SLIDING:
            return 0
        return max(0, num_computed_tokens - g.spec.sliding_window + 1) // self.block_size

    def get_computed_blocks(self, request_id: str, token_ids: list[int], max_cached_tokens: int) -> int:
        """Attach cached prefix blocks to a new request; returns how many of its tokens they hold. At most
        `max_cached_tokens` are taken so at least one token is always computed (it yields logits). A hit must
        hold, in every group, every block the next query reads: all of them in a full group, the window's in a
        sliding one."""
        bs = self.block_size
        hashes: list[int] = []
        parent = None
        for i in range(max_cached_tokens // bs):
            parent = hash_block(parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            hashes.append(parent)
        n = len(hashes)
        for g, pool in zip(self.groups, self.pools):
            if g.spec.kind != SLIDING:
                n = min(n, pool.num_cached_prefix(hashes))
        for g, pool in zip(self.groups, self.pools):
            if g.spec.kind == SLIDING:
                while n and not all(pool.cached_block(h) is not None
                                    for h in hashes[self._window_start_block(g, n * bs):n]):
                    n -= 1
        if self.enable_prefix_caching:
            self.num_cache_queries += len(hashes)
            self.num_cache_hits += n
        tables, released = [], []
        for g, pool in zip(self.groups, self.pools):
            start = self._window_start_block(g, n * bs) if n else 0
            hit = [pool.cached_block(h) for h in hashes[start:n]]
            pool.take(hit)
            tables.append([NULL_BLOCK] * start + hit)
            released.append(start)
        self._reqs[request_id] = _Tables(tables, hashes[:n], released)
        return n * bs

    def allocate_slots(self, request_id: str, num_computed_tokens: int, num_new_tokens: int,
                       num_lookahead_tokens: int = 0) -> list[list[int]] | None:
        """Make room for `num_new_tokens` (plus `num_lookahead_tokens` draft slots) after `num_computed_tokens`
        cached rows: first give back sliding-window blocks no query will read again, then grow every group's
        table. Returns the new block ids per group, or None, changing nothing else, when a pool is short."""
        t = self._reqs.get(request_id)
        if t is None:
            t = self._reqs[request_id] = _Tables([[] for _ in self.groups], [], [0] * len(self.groups))
        for gi, g in enumerate(self.groups):
            start = self._window_start_block(g, num_computed_tokens)
            table = t.block_ids[gi]
            for i in range(t.num_released[gi], min(start, len(table))):
                if table[i] != NULL_BLOCK:
                    self.pools[gi].free([table[i]])
                    table[i] = NULL_BLOCK
            t.num_released[gi] = max(t.num_released[gi], start)
        total = -(-(num_computed_tokens + num_new_tokens + num_lookahead_tokens) // self.block_size)
        need = [max(0, total - len(table)) for table in t.block_ids]
        if any(n > pool.num_free_blocks for n, pool in zip(need, self.pools)):
            return None
        new = [pool.allocate(n) for n, pool in zip(need, self.pools)]
        for table, ids in zip(t.block_ids, new):
            table.extend(ids)
        return new

    def cache_full_blocks(self, request_id: str, token_ids: list[int], num_final_tokens: int) -> None:
        """Publish every block full of final tokens (computed and verified: never a draft token that may be
        rolled back) under its prefix hash, in every group that still holds it."""
        t = self._reqs[request_id]
        bs = self.block_size
        while (len(t.hashes) + 1) * bs <= num_final_tokens:
            i = len(t.hashes)
            h = hash_block(t.hashes[-1] if t.hashes else None, tuple(token_ids[i * bs:(i + 1) * bs]))
            t.hashes.append(h)
            for pool, table in zip(self.pools, t.block_ids):
                if table[i] != NULL_BLOCK:
                    pool.cache_full_block(table[i], h)

    def free(self, request_id: str) -> None:
        t = self._reqs.pop(request_id, None)
        if t is None:
            return
        for pool, table in zip(self.pools, t.block_ids):
            pool.free([b for b in table if b != NULL_BLOCK])
