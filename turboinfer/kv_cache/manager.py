"""Per-request block bookkeeping on top of the BlockPool: which blocks a request owns, how many of its
tokens are already in the cache from a shared prefix, and hashing of blocks as they fill."""

from __future__ import annotations

from turboinfer.kv_cache.block_pool import BlockPool


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    # Chained: a block's hash covers every token before it, so equal hashes mean equal prefixes.
    return hash((parent_hash, token_ids))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.block_ids: dict[str, list[int]] = {}  # request_id -> its block table
        self._hashes: dict[str, list[int]] = {}  # request_id -> hashes of its full blocks so far

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        have = len(self.block_ids.get(request_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def get_computed_blocks(self, request_id: str, token_ids: list[int], max_cached_tokens: int) -> int:
        """Attach cached prefix blocks to a new request; returns how many of its tokens they hold.
        At most `max_cached_tokens` are taken so at least one token is always computed (it yields logits)."""
        bs = self.block_size
        hashes: list[int] = []
        parent = None
        for i in range(max_cached_tokens // bs):
            parent = hash_block(parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            hashes.append(parent)
        hit = self.pool.lookup(hashes)
        self.block_ids[request_id] = hit
        self._hashes[request_id] = hashes[: len(hit)]
        return len(hit) * bs

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(request_id, num_tokens) <= self.pool.num_free_blocks

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's table to cover `num_tokens`; the caller checked can_allocate."""
        table = self.block_ids.setdefault(request_id, [])
        table.extend(self.pool.allocate(self.blocks_needed(request_id, num_tokens)))
        return table

    def cache_full_blocks(self, request_id: str, token_ids: list[int], num_computed_tokens: int) -> None:
        """Publish every block that is now full of computed tokens under its prefix hash."""
        hashes = self._hashes.setdefault(request_id, [])
        table = self.block_ids[request_id]
        bs = self.block_size
        while (len(hashes) + 1) * bs <= num_computed_tokens:
            i = len(hashes)
            h = hash_block(hashes[-1] if hashes else None, tuple(token_ids[i * bs:(i + 1) * bs]))
            hashes.append(h)
            self.pool.cache_full_block(table[i], h)

    def free(self, request_id: str) -> None:
        self.pool.free(self.block_ids.pop(request_id, []))
        self._hashes.pop(request_id, None)
