"""Block pool, eviction policy and per-request manager: pure Python, no model."""

import subprocess
import sys

from turboinfer.kv_cache.block_pool import BlockPool
from turboinfer.kv_cache.eviction import LRUEviction
from turboinfer.kv_cache.manager import NULL_BLOCK, KVCacheManager, hash_block
from turboinfer.kv_cache.spec import FULL, SLIDING, KVCacheGroup, KVCacheSpec

FULL_SPEC = KVCacheSpec(FULL, 2, 8, "float32")


def manager(num_blocks: int, block_size: int, **kw) -> KVCacheManager:
    return KVCacheManager([KVCacheGroup(FULL_SPEC, (0,), num_blocks)], block_size, **kw)


def test_engine_and_kv_cache_import_no_torch():
    code = ("import sys; import turboinfer.engine.engine, turboinfer.engine.scheduler, turboinfer.kv_cache.manager; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocate_free_refcounts_and_null_block():
    pool = BlockPool(5)
    ids = pool.allocate(4)
    assert 0 not in ids and sorted(ids) == [1, 2, 3, 4] and pool.num_free_blocks == 0
    pool.free(ids)
    assert pool.num_free_blocks == 4


def test_prefix_hit_shares_blocks_and_survives_free():
    kv = manager(10, 4)
    tokens = list(range(12))
    kv.allocate_slots("a", 0, 12)
    kv.cache_full_blocks("a", tokens, 12)
    a_blocks = list(kv.block_tables("a")[0])
    # b shares the first 8 tokens; at most len-1 tokens may come from cache
    assert kv.get_computed_blocks("b", tokens[:8] + [99, 98, 97], 10) == 8
    assert kv.block_tables("b")[0] == a_blocks[:2]
    assert kv.pools[0].blocks[a_blocks[0]].ref_cnt == 2
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == 9
    # freed blocks stay findable until their memory is handed out again
    assert kv.get_computed_blocks("c", tokens, 11) == 8
    kv.free("c")


def test_eviction_is_lru_and_forgets_hash():
    kv = manager(4, 2)
    kv.allocate_slots("a", 0, 4)
    kv.cache_full_blocks("a", [1, 2, 3, 4], 4)
    kv.free("a")
    kv.allocate_slots("b", 0, 6)  # needs all 3 blocks: the cached ones are evicted
    assert kv.get_computed_blocks("c", [1, 2, 3, 4, 5], 4) == 0
    kv.free("b")
    kv.free("c")
    assert kv.num_free_blocks == 3


def test_eviction_policy_is_an_object_the_pool_takes():
    class MRU(LRUEviction):
        """Reuse the most recently freed block first."""

        def pop(self) -> int:
            block_id, _ = self._free.popitem(last=True)
            return block_id

    kv = manager(4, 2, eviction_factory=MRU)
    kv.allocate_slots("old", 0, 2)
    kv.cache_full_blocks("old", [1, 2], 2)
    kv.allocate_slots("new", 0, 2)
    kv.cache_full_blocks("new", [3, 4], 2)
    kv.free("old")
    kv.free("new")
    kv.allocate_slots("x", 0, 2)  # takes the newest free block: "new"'s prefix is forgotten, "old"'s kept
    assert kv.get_computed_blocks("p", [1, 2, 0], 2) == 2
    assert kv.get_computed_blocks("q", [3, 4, 0], 2) == 0


def test_different_prefix_same_block_tokens_do_not_collide():
    kv = manager(10, 2)
    kv.allocate_slots("a", 0, 4)
    kv.cache_full_blocks("a", [1, 2, 3, 4], 4)
    # same second block [3, 4] but a different first block: no hit at all
    assert kv.get_computed_blocks("b", [9, 9, 3, 4, 5], 4) == 0


def test_allocate_slots_checks_and_allocates_in_one_call():
    kv = manager(5, 4)  # 4 usable blocks
    assert [len(x) for x in kv.allocate_slots("a", 0, 6)] == [2]
    assert kv.allocate_slots("a", 6, 1) == [[]]  # row 6 still fits block 2
    assert kv.allocate_slots("b", 0, 8, num_lookahead_tokens=4) is None  # 3 blocks wanted, 2 free: nothing taken
    assert kv.num_free_blocks == 2
    new = kv.allocate_slots("b", 0, 5, num_lookahead_tokens=3)  # 5 tokens + 3 draft slots: 2 blocks
    assert [len(x) for x in new] == [2] and kv.num_free_blocks == 0
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == 4 and kv.num_requests == 0


def test_only_final_tokens_are_hashed():
    kv = manager(10, 4)
    kv.allocate_slots("a", 0, 8, num_lookahead_tokens=4)
    kv.cache_full_blocks("a", list(range(8)), 6)  # rows 6, 7 are not final: block 1 stays unpublished
    assert kv.get_computed_blocks("b", list(range(9)), 8) == 4


def sliding_manager(window: int, num_blocks: int = 20, block_size: int = 4, with_full: bool = True):
    groups = [KVCacheGroup(FULL_SPEC, (0,), num_blocks)] if with_full else []
    groups.append(KVCacheGroup(KVCacheSpec(SLIDING, 2, 8, "float32", window), (1, 2), num_blocks))
    return KVCacheManager(groups, block_size)


def test_sliding_window_blocks_are_freed_once_no_query_reads_them():
    kv = sliding_manager(window=6)
    kv.allocate_slots("a", 0, 16)  # a 16-token prefill: 4 blocks in each group
    full, sliding = kv.pools
    assert full.num_free_blocks == sliding.num_free_blocks == 15
    # the next query is at row 16 and sees rows 11..16: blocks 0 and 1 (rows 0..7) are never read again
    kv.allocate_slots("a", 16, 1)
    table = kv.block_tables("a")[1]
    assert table[:2] == [NULL_BLOCK, NULL_BLOCK] and NULL_BLOCK not in table[2:] and len(table) == 5
    assert sliding.num_free_blocks == 15 - 1 + 2 and full.num_free_blocks == 14
    kv.free("a")
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_sliding_window_prefix_hit_needs_only_the_window():
    kv = sliding_manager(window=6)
    tokens = list(range(24))
    kv.allocate_slots("a", 0, 24)
    kv.cache_full_blocks("a", tokens, 24)
    kv.allocate_slots("a", 24, 1)  # frees blocks wholly before row 24 - 6 + 1 = 19: blocks 0..3
    kv.free("a")
    # a new request sharing 20 tokens: 5 blocks from the full group, the window's blocks (4) from the sliding one
    assert kv.get_computed_blocks("b", tokens[:20] + [99], 20) == 20
    assert kv.block_tables("b")[1] == [NULL_BLOCK] * 3 + [kv.pools[1].cached_block(h) for h in
                                                          kv._reqs["b"].hashes[3:5]]
    kv.free("b")
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_sliding_hit_shrinks_to_where_the_window_is_still_cached():
    kv = sliding_manager(window=6)
    tokens = list(range(24))
    kv.allocate_slots("a", 0, 24)
    kv.cache_full_blocks("a", tokens, 24)
    kv.free("a")
    hashes, parent = [], None
    for i in range(6):
        parent = hash_block(parent, tuple(tokens[i * 4:(i + 1) * 4]))
        hashes.append(parent)
    sliding = kv.pools[1]
    sliding._cached.pop(hashes[4])  # the sliding group forgot rows 16..19 (the full group still has them)
    # 20 cached tokens would need sliding blocks 3 and 4; 16 need blocks 2 and 3, which are there
    assert kv.get_computed_blocks("b", tokens[:20] + [99], 20) == 16
    assert kv.block_tables("b")[1] == [NULL_BLOCK] * 2 + [sliding.cached_block(h) for h in hashes[2:4]]
    assert len(kv.block_tables("b")[0]) == 4
    kv.free("b")
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_only_sliding_layers_prefix_hit():
    kv = sliding_manager(window=4, with_full=False)
    tokens = list(range(16))
    kv.allocate_slots("a", 0, 16)
    kv.cache_full_blocks("a", tokens, 16)
    kv.free("a")
    assert kv.get_computed_blocks("b", tokens + [1], 16) == 16
    assert kv.block_tables("b")[0][:3] == [NULL_BLOCK] * 3
    kv.free("b")
