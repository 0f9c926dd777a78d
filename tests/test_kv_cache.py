"""The paged KV cache: block pool accounting, block tables, and the tensor helpers."""

import random

import pytest
import torch

from fastllm.runtime.kv_cache import (
    CPU_DEFAULT_NUM_KV_TOKENS,
    BlockPool,
    BlockTable,
    KVCacheConfig,
    OutOfBlocks,
    allocate_kv_cache,
    blocks_needed,
    hash_block,
    kv_cache_bytes_per_block,
    num_blocks_from_memory,
    plan_num_blocks,
)


def _assert_all_free(pool: BlockPool) -> None:
    assert pool.num_free_blocks == pool.num_blocks
    assert pool.ref_counts == [0] * pool.num_blocks


def test_blocks_needed():
    assert [blocks_needed(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="block_size"):
        blocks_needed(3, 0)


@pytest.mark.parametrize("args", [(0, 16), (8, 0), (-1, 16), (8.0, 16), (True, 16)])
def test_pool_rejects_bad_sizes(args):
    with pytest.raises(ValueError, match="num_blocks|block_size"):
        BlockPool(*args)


def test_pool_allocate_incref_free():
    pool = BlockPool(num_blocks=8, block_size=4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free_blocks == 5
    assert all(pool.ref_counts[b] == 1 for b in a)
    assert pool.can_allocate(5) and not pool.can_allocate(6)
    assert pool.allocate(0) == []

    pool.incref(a[:2])
    pool.free(a)  # a[2] back to the free list, a[:2] still shared
    assert pool.num_free_blocks == 6
    assert [pool.ref_counts[b] for b in a] == [1, 1, 0]
    pool.free(a[:2])
    _assert_all_free(pool)


def test_out_of_blocks_allocates_nothing():
    pool = BlockPool(num_blocks=4, block_size=2)
    held = pool.allocate(3)
    before = (pool.num_free_blocks, list(pool.ref_counts))
    with pytest.raises(OutOfBlocks, match="need 2 KV-cache blocks, 1 of 4 free"):
        pool.allocate(2)
    assert (pool.num_free_blocks, pool.ref_counts) == before
    pool.free(held)
    _assert_all_free(pool)


def test_double_free_and_bad_ids_raise_and_change_nothing():
    pool = BlockPool(num_blocks=4, block_size=2)
    a, b = pool.allocate(2)
    pool.free([a])
    with pytest.raises(ValueError, match="double free"):
        pool.free([a])
    with pytest.raises(ValueError, match="double free"):
        pool.free([b, b])  # held once, freed twice: neither decref happens
    assert pool.ref_counts[b] == 1
    with pytest.raises(ValueError, match="share"):
        pool.incref([a])  # a free block cannot gain a holder
    for bad in (-1, 4, "0"):
        with pytest.raises(ValueError, match="no block"):
            pool.free([bad])
    pool.free([b])
    _assert_all_free(pool)


def test_no_leak_after_random_sequences():
    rng = random.Random(0)
    pool = BlockPool(num_blocks=64, block_size=4)
    live: list[BlockTable] = []
    shared: list[list[int]] = []  # extra holders added with incref
    for _ in range(1000):
        op = rng.random()
        if op < 0.4 or not live:  # a new sequence
            table = BlockTable(pool)
            try:
                table.ensure_capacity(rng.randint(1, 40))
            except OutOfBlocks:
                assert table.blocks == [] and table.num_tokens == 0
                continue
            live.append(table)
        elif op < 0.75:  # a sequence grows
            table = rng.choice(live)
            before = (list(table.blocks), table.num_tokens, pool.num_free_blocks)
            try:
                table.ensure_capacity(table.num_tokens + rng.randint(1, 9))
            except OutOfBlocks:
                assert (table.blocks, table.num_tokens, pool.num_free_blocks) == before
        elif op < 0.85:  # another holder of a sequence's blocks (prefix sharing)
            blocks = list(rng.choice(live).blocks)
            pool.incref(blocks)
            shared.append(blocks)
        else:  # a sequence ends
            live.pop(rng.randrange(len(live))).free()
        held = sum(len(t.blocks) for t in live) + sum(len(s) for s in shared)
        assert sum(pool.ref_counts) == held
        assert pool.num_free_blocks == sum(c == 0 for c in pool.ref_counts)
    for table in live:
        table.free()
    for blocks in shared:
        pool.free(blocks)
    _assert_all_free(pool)


def test_cached_blocks_are_evictable_lru_and_count_as_free():
    pool = BlockPool(num_blocks=4, block_size=2)
    b0, b1, b2, b3 = pool.allocate(4)
    tokens = [[i, i] for i in range(3)]
    h = [hash_block(None, t) for t in tokens]
    assert [pool.cache(b, x, None, t) for b, x, t in zip((b0, b1, b2), h, tokens)] == [True] * 3
    assert pool.cache(b0, h[0], None, tokens[0])  # re-registering is a no-op
    assert not pool.cache(b3, h[0], None, [9, 9])  # other content under a taken key (a collision) is refused
    assert pool.num_hash_mismatches == 1
    with pytest.raises(ValueError, match="another hash"):
        pool.cache(b0, h[1], None, tokens[1])
    with pytest.raises(ValueError, match="another hash or content"):
        pool.cache(b0, h[0], None, [7, 7])
    assert pool.num_cached_blocks == 3 and pool.block_hashes[b3] is None
    pool.free([b1, b0, b2, b3])  # LRU order of the cached ones: b1, b0, b2; b3 goes to the free list
    assert pool.num_free_blocks == 4 and pool.ref_counts == [0] * 4 and pool.lookup(h[1], None, tokens[1]) == b1
    pool.incref([pool.lookup(h[1], None, tokens[1])])  # a hit revives an evictable block ...
    assert pool.ref_counts[b1] == 1 and pool.num_free_blocks == 3
    pool.free([b1])  # ... and freeing it again makes it the most recently used
    with pytest.raises(ValueError, match="double free"):
        pool.free([b1])  # evictable is not held
    assert pool.allocate(1) == [b3]  # the free list first
    assert pool.num_evictions == 0
    assert pool.allocate(2) == [b0, b2]  # then evict, least recently used first
    assert [pool.lookup(x, None, t) for x, t in zip(h, tokens)] == [None, b1, None]
    assert pool.num_evictions == 2 and pool.block_hashes[b0] is None and pool.num_hash_mismatches == 1
    with pytest.raises(OutOfBlocks):
        pool.allocate(2)
    pool.free([b3, b0, b2])
    with pytest.raises(ValueError, match="refcount is 0"):
        pool.incref([b3])  # a block on the free list has no content to share
    with pytest.raises(ValueError, match="not held"):
        pool.cache(b3, h[0], None, tokens[0])
    assert pool.num_free_blocks == 4 and pool.num_cached_blocks == 1


def test_lookup_serves_a_block_only_for_its_own_tokens_and_parent_key():
    pool = BlockPool(num_blocks=2, block_size=2)
    (b,) = pool.allocate(1)
    parent = hash_block(None, [0, 0])
    key = hash_block(parent, [1, 2])
    assert pool.cache(b, key, parent, [1, 2])
    assert pool.lookup(key, parent, [1, 2]) == b and pool.num_hash_mismatches == 0
    # The same key asked for with other content: what a collision looks like. Each is a counted miss.
    assert pool.lookup(key, parent, [2, 1]) is None
    assert pool.lookup(key, None, [1, 2]) is None
    assert pool.lookup(key, hash_block(None, [0, 1]), [1, 2]) is None
    assert pool.num_hash_mismatches == 3
    assert pool.lookup(hash_block(None, [5, 5]), None, [5, 5]) is None  # an unknown key: a plain miss
    assert pool.num_hash_mismatches == 3
    pool.free([b])
    pool.allocate(2)  # evicts b: its key and stored content go with it
    assert pool.lookup(key, parent, [1, 2]) is None and pool.num_cached_blocks == 0
    assert pool._block_contents == [None, None] and not pool._key_to_blocks


def test_blocks_of_one_content_share_a_key_and_the_key_outlives_each():
    """Two requests that computed the same block at once both register it; evicting one keeps the key."""
    pool = BlockPool(num_blocks=3, block_size=2)
    first, second, other = pool.allocate(3)
    key = hash_block(None, [1, 2])
    assert pool.cache(first, key, None, [1, 2]) and pool.cache(second, key, None, [1, 2])
    assert pool.num_cached_blocks == 2 and pool.lookup(key, None, [1, 2]) == first
    pool.free([first, other])  # first: evictable; other: free list
    assert pool.allocate(2) == [other, first] and pool.num_evictions == 1
    assert pool.lookup(key, None, [1, 2]) == second and pool.num_cached_blocks == 1


def test_block_table_free_parks_cached_blocks_tail_first():
    pool = BlockPool(num_blocks=3, block_size=2)
    table = BlockTable(pool)
    table.ensure_capacity(6)
    for i, b in enumerate(table.blocks):
        pool.cache(b, hash_block(None, [i]), None, [i])
    first, *_, last = table.blocks
    table.free()
    assert pool.allocate(1) == [last]  # a prefix's last block is evicted first, its first block last
    assert pool.allocate(2)[-1] == first


def test_block_table_slots_across_shuffled_blocks():
    pool = BlockPool(num_blocks=10, block_size=4)
    pool.free(list(reversed(pool.allocate(10))))  # the free list now hands out blocks in reverse
    pool.allocate(1)  # block 9 is taken; the table gets 8, 7, 6
    table = BlockTable(pool)
    table.ensure_capacity(9)
    assert table.blocks == [8, 7, 6] and table.num_tokens == 9
    assert [table.slot(p) for p in range(9)] == [32, 33, 34, 35, 28, 29, 30, 31, 24]
    assert table.slots(2, 7) == [34, 35, 28, 29, 30]
    assert table.slots(3, 3) == []
    with pytest.raises(IndexError):
        table.slot(9)  # reserved capacity is 12, but only 9 positions were asked for
    with pytest.raises(IndexError):
        table.slots(0, 10)
    table.ensure_capacity(5)  # never shrinks
    assert table.num_tokens == 9 and len(table.blocks) == 3
    table.free()
    assert table.blocks == [] and table.num_tokens == 0

    rng = random.Random(1)
    ids = pool.allocate(9)
    rng.shuffle(ids)
    pool.free(ids)  # the free list is now a random permutation
    table.ensure_capacity(30)
    assert table.slots(0, 30) == [table.blocks[p // 4] * 4 + p % 4 for p in range(30)]
    assert len(set(table.slots(0, 30))) == 30


def test_block_table_ensure_capacity_is_atomic():
    pool = BlockPool(num_blocks=3, block_size=2)
    table = BlockTable(pool)
    table.ensure_capacity(3)
    with pytest.raises(OutOfBlocks):
        table.ensure_capacity(7)  # needs 2 more blocks, 1 free
    assert len(table.blocks) == 2 and table.num_tokens == 3 and pool.num_free_blocks == 1
    table.ensure_capacity(6)
    assert pool.num_free_blocks == 0
    table.free()
    assert pool.num_free_blocks == 3


# ---- tensors ----------------------------------------------------------------------------------------------


def test_allocate_kv_cache_shapes():
    caches = allocate_kv_cache(num_layers=3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8,
                               dtype=torch.bfloat16, device="cpu")
    assert len(caches) == 3
    for k, v in caches:
        for t in (k, v):
            assert t.shape == (5, 4, 2, 8) and t.dtype == torch.bfloat16 and t.is_contiguous()
            assert not t.any()  # CPU caches are zero-filled
    caches[0][0][1, 2] = 1.0  # the views do not overlap
    assert sum(int(t.count_nonzero()) for kv in caches for t in kv) == 2 * 8
    with pytest.raises(ValueError, match="num_blocks"):
        allocate_kv_cache(1, 0, 4, 2, 8, torch.float32, "cpu")


def test_bytes_per_block_and_blocks_from_memory():
    assert kv_cache_bytes_per_block(2, 4, 64, 16, torch.float16) == 2 * 2 * 16 * 4 * 64 * 2
    assert kv_cache_bytes_per_block(1, 1, 1, 1, torch.float32) == 8
    assert num_blocks_from_memory(1000, 0.5, 100) == 5
    assert num_blocks_from_memory(1099, 1.0, 100) == 10
    with pytest.raises(ValueError):
        num_blocks_from_memory(1000, 0.0, 100)


def test_plan_num_blocks(monkeypatch):
    shape = dict(num_layers=2, num_kv_heads=4, head_dim=64, dtype=torch.float16)
    assert plan_num_blocks(KVCacheConfig(block_size=16, num_kv_tokens=100), device="cpu", **shape) == 7
    assert plan_num_blocks(KVCacheConfig(block_size=16), device="cpu", **shape) == CPU_DEFAULT_NUM_KV_TOKENS // 16
    with pytest.raises(ValueError, match="num_kv_tokens is required"):
        plan_num_blocks(KVCacheConfig(), device="meta", **shape)

    per_block = kv_cache_bytes_per_block(block_size=16, **shape)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * per_block + 7, 10**12))
    assert plan_num_blocks(KVCacheConfig(kv_cache_memory_fraction=0.5), device="cuda", **shape) == 50
    assert plan_num_blocks(KVCacheConfig(num_kv_tokens=32), device="cuda", **shape) == 2  # explicit size wins
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (per_block - 1, 10**12))
    with pytest.raises(RuntimeError, match="no room for the KV cache"):
        plan_num_blocks(KVCacheConfig(kv_cache_memory_fraction=1.0), device="cuda", **shape)


@pytest.mark.parametrize("kwargs, field", [
    (dict(block_size=0), "block_size"),
    (dict(block_size=16.0), "block_size"),
    (dict(kv_cache_memory_fraction=0.0), "kv_cache_memory_fraction"),
    (dict(kv_cache_memory_fraction=1.5), "kv_cache_memory_fraction"),
    (dict(kv_cache_memory_fraction="0.9"), "kv_cache_memory_fraction"),
    (dict(num_kv_tokens=0), "num_kv_tokens"),
    (dict(num_kv_tokens=1.5), "num_kv_tokens"),
])
def test_kv_cache_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        KVCacheConfig(**kwargs)


def test_kv_cache_config_defaults():
    config = KVCacheConfig()
    assert (config.block_size, config.kv_cache_memory_fraction, config.num_kv_tokens) == (16, 0.9, None)
    assert KVCacheConfig(kv_cache_memory_fraction=1, num_kv_tokens=1).num_kv_tokens == 1
