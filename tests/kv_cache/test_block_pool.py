"""Block pool and per-request manager: pure Python, no model."""

from turboinfer.kv_cache.block_pool import BlockPool
from turboinfer.kv_cache.manager import KVCacheManager


def test_allocate_free_refcounts_and_null_block():
    pool = BlockPool(5)
    ids = pool.allocate(4)
    assert 0 not in ids and sorted(ids) == [1, 2, 3, 4] and pool.num_free_blocks == 0
    pool.free(ids)
    assert pool.num_free_blocks == 4


def test_prefix_hit_shares_blocks_and_survives_free():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    tokens = list(range(12))
    kv.allocate("a", 12)
    kv.cache_full_blocks("a", tokens, 12)
    a_blocks = list(kv.block_ids["a"])
    # b shares the first 8 tokens; at most len-1 tokens may come from cache
    assert kv.get_computed_blocks("b", tokens[:8] + [99, 98, 97], 10) == 8
    assert kv.block_ids["b"] == a_blocks[:2]
    assert kv.pool.blocks[a_blocks[0]].ref_cnt == 2
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == 9
    # freed blocks stay findable until their memory is handed out again
    assert kv.get_computed_blocks("c", tokens, 11) == 8
    kv.free("c")


def test_eviction_is_lru_and_forgets_hash():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    kv.allocate("a", 4)
    kv.cache_full_blocks("a", [1, 2, 3, 4], 4)
    kv.free("a")
    kv.allocate("b", 6)  # needs all 3 blocks: the cached ones are evicted
    assert kv.get_computed_blocks("c", [1, 2, 3, 4, 5], 4) == 0
    kv.free("b")
    kv.free("c")
    assert kv.num_free_blocks == 3


def test_different_prefix_same_block_tokens_do_not_collide():
    kv = KVCacheManager(num_blocks=10, block_size=2)
    kv.allocate("a", 4)
    kv.cache_full_blocks("a", [1, 2, 3, 4], 4)
    # same second block [3, 4] but a different first block: no hit at all
    assert kv.get_computed_blocks("b", [9, 9, 3, 4, 5], 4) == 0
