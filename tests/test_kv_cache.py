"""The paged KV cache: block pool accounting, block tables, and the tensor helpers."""

import random

import pytest
import torch

from fastllm.runtime.kv_cache import (
    CPU_MAX_NUM_KV_TOKENS,
    INITIAL_NUM_KV_TOKENS,
    BlockPool,
    BlockTable,
    KVCacheConfig,
    OutOfBlocks,
    allocate_kv_cache,
    blocks_needed,
    cap_num_blocks,
    hash_block,
    kv_cache_bytes_per_block,
    max_num_blocks,
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


def test_bytes_per_block():
    assert kv_cache_bytes_per_block(2, 4, 64, 16, torch.float16) == 2 * 2 * 16 * 4 * 64 * 2
    assert kv_cache_bytes_per_block(1, 1, 1, 1, torch.float32) == 8


def test_cap_counts_what_is_in_use_against_the_fraction_of_the_card():
    gib = 2**30
    # A 100 GiB card, 20 GiB in use (weights, another model, this cache's 1 GiB), 0.9 allowed, 5 GiB for
    # activations: 90 - 20 - 5 = 65 GiB more, in 1 GiB blocks, on top of the 1 block held.
    assert cap_num_blocks(total_bytes=100 * gib, free_bytes=80 * gib, fraction=0.9, reserved_bytes=5 * gib,
                          held_blocks=1, bytes_per_block=gib) == 66
    # Already over the budget (a second model filled the card): the cache keeps what it holds, no more.
    assert cap_num_blocks(total_bytes=100 * gib, free_bytes=5 * gib, fraction=0.9, reserved_bytes=0,
                          held_blocks=3, bytes_per_block=gib) == 3
    with pytest.raises(ValueError):
        cap_num_blocks(total_bytes=100, free_bytes=50, fraction=0.0, reserved_bytes=0, held_blocks=0,
                       bytes_per_block=1)


def test_max_num_blocks(monkeypatch):
    per_block = kv_cache_bytes_per_block(2, 4, 64, 16, torch.float16)
    assert max_num_blocks(KVCacheConfig(block_size=16, num_kv_tokens=100), device="cpu", bytes_per_block=per_block,
                          held_blocks=7) == 7  # a fixed size never grows
    assert max_num_blocks(KVCacheConfig(block_size=16), device="cpu", bytes_per_block=per_block,
                          held_blocks=4) == CPU_MAX_NUM_KV_TOKENS // 16
    with pytest.raises(ValueError, match="num_kv_tokens is required"):
        max_num_blocks(KVCacheConfig(), device="meta", bytes_per_block=per_block, held_blocks=1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (600 * per_block, 1000 * per_block))
    # 0.5 of 1000 blocks' worth, 400 in use, 50 reserved: 50 more than the 10 held.
    assert max_num_blocks(KVCacheConfig(kv_cache_memory_fraction=0.5), device="cuda", bytes_per_block=per_block,
                          held_blocks=10, reserved_bytes=50 * per_block) == 60


def test_initial_blocks():
    assert KVCacheConfig(block_size=16).initial_blocks() == INITIAL_NUM_KV_TOKENS // 16
    assert KVCacheConfig(block_size=16, num_kv_tokens=100).initial_blocks() == 7


class _Tensors:
    """Stands in for the runner: records the sizes the pool asked for and backs at most `limit` blocks."""

    def __init__(self, limit: int):
        self.limit, self.asked = limit, []

    def __call__(self, target: int) -> int:
        self.asked.append(target)
        return min(target, self.limit)


def test_a_growing_pool_doubles_up_to_its_cap_and_loses_no_block():
    tensors = _Tensors(limit=1000)
    pool = BlockPool(4, 16, max_num_blocks=20, grow=tensors)
    tables = []
    for _ in range(6):  # 6 x 3 blocks: grows 4 -> 8 -> 16 -> 20 (doubling, then the cap)
        table = BlockTable(pool)
        table.ensure_capacity(3 * 16)
        tables.append(table)
    assert tensors.asked == [8, 16, 20] and pool.num_blocks == 20 and pool.num_growths == 3
    held = sorted(b for t in tables for b in t.blocks)
    assert held == sorted(set(held)) and len(held) == 18 and max(held) < 20  # no block twice, none lost
    with pytest.raises(OutOfBlocks):  # at the cap: out of blocks for real
        BlockTable(pool).ensure_capacity(3 * 16)
    assert pool.num_blocks == 20
    for t in tables:
        t.free()
    _assert_all_free(pool)


def test_growth_short_of_memory_grows_less_and_allocation_fails_cleanly():
    tensors = _Tensors(limit=6)
    pool = BlockPool(4, 16, max_num_blocks=64, grow=tensors)
    assert pool.can_allocate(6)  # grew to what memory allowed
    assert pool.num_blocks == 6
    assert not pool.can_allocate(7)
    with pytest.raises(OutOfBlocks):
        pool.allocate(7)
    assert pool.ref_counts == [0] * 6  # all or nothing


def test_a_fixed_pool_never_grows():
    pool = BlockPool(4, 16)
    assert pool.max_num_blocks == 4 and not pool.can_allocate(5)
    with pytest.raises(ValueError, match="max_num_blocks"):
        BlockPool(4, 16, max_num_blocks=3)


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
