"""Prefix caching: shared full blocks, chained SHA-256 keys checked against the tokens, LRU eviction, no leaks.

The model here (`PrefixModel`, built on test_scheduler's fake model) stores in each cache slot its token and,
as real K/V depend on, the whole prefix up to that position, and reads each request's context back through its
block table (asserting both are the request's), so a wrongly shared, evicted-but-still-referenced or
overwritten block, or one reused after another prefix, fails the run; outputs are compared with running alone
without caching.
"""

import hashlib
import random
import struct

import pytest

from fastllm.runtime import scheduler as scheduler_module
from fastllm.runtime.kv_cache import BlockPool, hash_block, pack_token_ids
from fastllm.runtime.scheduler import Request, RequestStatus, Scheduler, SchedulerOutput
from tests.test_scheduler import VOCAB, FakeModel, alone, req


class PrefixModel(FakeModel):
    """FakeModel whose slots also keep what real K/V depend on: the whole prefix up to their position. A block
    reused after another prefix has the right tokens but another prefix, and fails the read-back."""

    def __init__(self, pool: BlockPool) -> None:
        super().__init__(pool)
        self.prefixes: list[tuple[int, ...] | None] = [None] * len(self.cache)

    def step(self, out: SchedulerOutput) -> dict:
        for c in out.chunks:
            tokens = c.request.all_token_ids
            for pos, slot in zip(range(c.start, c.start + c.num_tokens), c.slots):
                self.prefixes[slot] = tuple(tokens[:pos + 1])
        sampled = super().step(out)
        for c in out.chunks:
            if c.samples:
                end, tokens = c.start + c.num_tokens, c.request.all_token_ids
                got = [self.prefixes[s] for s in c.request.block_table.slots(0, end)]
                assert got == [tuple(tokens[:pos + 1]) for pos in range(end)], "K/V computed after another prefix"
        return sampled


def check_pool(sched: Scheduler) -> None:
    """Refcounts equal the holders in running block tables; free + held blocks account for the whole pool; the
    blocks under one key hold one content, and a registered block's parent key still names blocks."""
    pool = sched.pool
    holders = [0] * pool.num_blocks
    for r in sched.running:
        for b in r.block_table.blocks:
            holders[b] += 1
    assert holders == pool.ref_counts
    assert pool.num_free_blocks == sum(c == 0 for c in pool.ref_counts)
    registered = [b for b, h in enumerate(pool.block_hashes) if h is not None]
    assert sorted(b for blocks in pool._key_to_blocks.values() for b in blocks) == registered
    assert pool.num_cached_blocks == len(registered)
    for key, blocks in pool._key_to_blocks.items():
        assert blocks and all(pool.block_hashes[b] == key for b in blocks)
        ((parent, _),) = {pool._block_contents[b] for b in blocks}
        assert parent is None or parent in pool._key_to_blocks


def hit(sched: Scheduler, r: Request, i: int) -> int | None:
    """The pool's answer for request `r`'s block `i`, asked as the scheduler asks it."""
    bs = sched.pool.block_size
    return sched.pool.lookup(r.block_hashes[i], r.block_hashes[i - 1] if i else None,
                             r.all_token_ids[i * bs:(i + 1) * bs])


def step(sched: Scheduler, model: FakeModel) -> tuple[SchedulerOutput, list[Request]]:
    out = sched.schedule()
    finished = sched.update(out, model.step(out))
    check_pool(sched)
    return out, finished


def run(sched: Scheduler, model: FakeModel) -> None:
    for _ in range(10_000):
        if not sched.has_unfinished():
            break
        step(sched, model)
    assert not sched.has_unfinished()
    assert sched.pool.num_free_blocks == sched.pool.num_blocks and not any(sched.pool.ref_counts)


def caching(num_blocks: int, block_size: int, max_model_len: int, **kwargs) -> tuple[Scheduler, FakeModel]:
    pool = BlockPool(num_blocks, block_size)
    return Scheduler(pool, max_model_len=max_model_len, enable_prefix_caching=True, **kwargs), PrefixModel(pool)


def test_second_request_computes_only_its_suffix_and_shares_the_system_prompt():
    sched, model = caching(32, 4, 64)
    system = [(5 * i + 3) % VOCAB for i in range(12)]  # 3 full blocks
    a = req("a", system + [1, 2, 3], max_new_tokens=4)
    sched.add(a)
    out, _ = step(sched, model)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(0, 15)]
    assert sched.pool.num_cached_blocks == 3  # the full prompt blocks; block 3 is partial

    b = req("b", system + [7, 8, 9, 10, 11], max_new_tokens=4)
    sched.add(b)
    out, _ = step(sched, model)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 15, 1), ("b", 12, 5)]
    assert b.num_cached_tokens == 12 and b.num_computed_tokens == 17
    shared = a.block_table.blocks[:3]
    assert b.block_table.blocks[:3] == shared and [sched.pool.ref_counts[x] for x in shared] == [2, 2, 2]
    assert not set(b.block_table.blocks[3:]) & set(a.block_table.blocks)
    assert sched.stats()["prefix_cache_hit_rate"] == pytest.approx(12 / (15 + 17))

    run(sched, model)
    assert a.output_token_ids == alone(a, 64) and b.output_token_ids == alone(b, 64)
    # Both gone: the shared blocks are evictable, still found by key.
    assert [hit(sched, a, i) for i in range(3)] == shared
    assert sched.stats()["prefix_cache_hash_mismatches"] == 0


@pytest.mark.parametrize("prompt_len", [12, 14])
def test_the_block_being_written_is_never_shared(prompt_len):
    sched, model = caching(32, 4, 64)
    a = req("a", list(range(10, 10 + prompt_len)), max_new_tokens=8)
    sched.add(a)
    step(sched, model)
    step(sched, model)  # a decodes into its last, partial block (13 or 15 positions computed)
    last = a.block_table.blocks[-1]
    assert sched.pool.block_hashes[last] is None
    # 12: b's prompt is a's 3 full blocks, all cached, but b computes at least its last token itself, so it
    # shares 2 and writes its own block 2. 14: b's tokens equal all of a's, but a's block 3 is still partial.
    b = req("b", a.all_token_ids[:12] if prompt_len == 12 else a.all_token_ids, max_new_tokens=3)
    sched.add(b)
    out = sched.schedule()
    hit = 8 if prompt_len == 12 else 12
    assert b.num_cached_tokens == hit and b.block_table.blocks[:hit // 4] == a.block_table.blocks[:hit // 4]
    (cb,) = [c for c in out.chunks if c.request is b]
    assert cb.start == hit and cb.start + cb.num_tokens == b.num_tokens
    assert not set(b.block_table.blocks[hit // 4:]) & set(a.block_table.blocks)
    assert sched.pool.ref_counts[last] == 1
    sched.update(out, model.step(out))
    run(sched, model)
    assert a.output_token_ids == alone(a, 64) and b.output_token_ids == alone(b, 64)


def test_hash_chaining_same_block_after_a_different_prefix_is_a_miss():
    assert hash_block(None, [5, 6]) == hash_block(None, (5, 6))
    assert hash_block(hash_block(None, [1, 2]), [5, 6]) != hash_block(hash_block(None, [0, 0]), [5, 6])
    sched, model = caching(16, 4, 32)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], max_new_tokens=2)
    sched.add(a)
    run(sched, model)
    cases = [([0, 0, 0, 0, 5, 6, 7, 8, 9], 0),   # block 1 matches a's, but after another block 0
             ([1, 2, 3, 4, 0, 0, 0, 0, 9], 4),   # block 0 matches
             ([1, 2, 3, 4, 5, 6, 7, 8, 0], 8)]   # both match
    for i, (prompt, hit) in enumerate(cases):
        r = req(i, prompt, max_new_tokens=2)
        sched.add(r)
        run(sched, model)
        assert r.num_cached_tokens == hit and r.output_token_ids == alone(r, 32)


def test_keys_are_sha256_of_the_parent_key_and_packed_token_ids():
    # Pinned, so a change of encoding is deliberate; the same in every process (no hash randomisation).
    assert hash_block(None, [1, 2]) == hashlib.sha256(bytes(32) + struct.pack("<2q", 1, 2)).digest()
    parent = hash_block(None, [1, 2])
    assert hash_block(parent, [3]) == hashlib.sha256(parent + struct.pack("<q", 3)).digest()
    assert pack_token_ids([1, 23]) == b"\x01" + bytes(7) + b"\x17" + bytes(7)
    with pytest.raises(ValueError, match="32-byte"):
        hash_block(b"short", [1])


@pytest.mark.parametrize("a, b", [
    ([-1], [-2]),  # CPython: hash(-1) == hash(-2), so the tuple-hash keys of these blocks were equal
    ([2**61 - 1], [0]),  # ints hash modulo 2**61 - 1: another tuple-hash collision
    ([1, 23], [12, 3]),  # equal when joined as digits
    ([1, 2, 3], [12, 3]),
    ([1, 2], [1, 2, 0]),  # a trailing zero id is not padding
    ([0], []),
    ([256], [0, 1]),  # equal as a variable-width byte string
])
def test_keys_tell_apart_token_lists_that_a_weaker_encoding_confuses(a, b):
    if (a, b) in (([-1], [-2]), ([2**61 - 1], [0])):
        assert hash((None, tuple(a))) == hash((None, tuple(b)))  # the old key's collision is real
    assert hash_block(None, a) != hash_block(None, b)
    assert pack_token_ids(a) != pack_token_ids(b)


def test_the_same_block_under_another_parent_gets_another_key():
    block, k12 = [5, 6], hash_block(None, [1, 2])
    parents = [None, k12, hash_block(None, [0, 0]), hash_block(k12, [3, 4]), hash_block(None, [3, 4])]
    assert len({hash_block(parent, block) for parent in parents}) == len(parents)


def test_a_forced_key_collision_is_a_miss_never_a_leak(monkeypatch):
    """Every block of every prompt gets one key: the pool must tell the prompts apart by their tokens."""
    monkeypatch.setattr(scheduler_module, "hash_block", lambda parent_hash, token_ids: b"\x07" * 32)
    sched, model = caching(16, 4, 32)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], max_new_tokens=2)
    sched.add(a)
    step(sched, model)
    a_blocks = list(a.block_table.blocks)
    # a's block 0 is registered; its block 1 came under the same key with other tokens: refused, counted.
    assert sched.pool.num_cached_blocks == 1 and sched.pool.num_hash_mismatches == 1
    run(sched, model)

    b = req("b", [11, 12, 13, 14, 15, 16, 17, 18, 19], max_new_tokens=2)
    sched.add(b)
    out, _ = step(sched, model)
    assert b.num_cached_tokens == 0 and [(c.start, c.num_tokens) for c in out.chunks] == [(0, 9)]
    assert not set(b.block_table.blocks) & set(a_blocks)  # b computes its own K/V: a's block 0 is not served
    # b's lookup of block 0 found a's (1), and registering b's block 0 found it again (1); b's block 1 was not
    # offered (its block 0 is not registered).
    assert sched.stats()["prefix_cache_hash_mismatches"] == 3 and sched.stats()["prefix_cache_hits"] == 0
    run(sched, model)
    assert a.output_token_ids == alone(a, 32) and b.output_token_ids == alone(b, 32)

    # A genuine shared prefix still hits, as far as the stored tokens agree: block 0 is a's, block 1's key
    # holds a's block 0, whose tokens are not these.
    a2 = req("a2", a.prompt_token_ids, max_new_tokens=2)
    sched.add(a2)
    run(sched, model)
    assert a2.num_cached_tokens == 4 and a2.output_token_ids == a.output_token_ids


def test_blocks_after_a_refused_block_are_not_registered(monkeypatch):
    """A collision of first blocks only. x's block 1 was computed after x's block 0, whose key is w's: were it
    registered (under its honest key, parent key = w's block 0 key), y = w's block 0 + x's block 1 would be
    served x's K/V of block 1, computed after other tokens; its tokens and parent key would both match."""
    def first_blocks_collide(parent_hash, token_ids):
        return hash_block(None, [0]) if parent_hash is None else hash_block(parent_hash, token_ids)

    monkeypatch.setattr(scheduler_module, "hash_block", first_blocks_collide)
    sched, model = caching(16, 4, 32)
    w = req("w", [1, 2, 3, 4, 5], max_new_tokens=1)
    sched.add(w)
    run(sched, model)
    x = req("x", [9, 9, 9, 9, 5, 6, 7, 8, 0], max_new_tokens=2)
    sched.add(x)
    step(sched, model)
    assert x.num_cached_tokens == 0 and sched.pool.block_hashes[x.block_table.blocks[0]] is None
    assert sched.pool.block_hashes[x.block_table.blocks[1]] is None
    run(sched, model)
    y = req("y", [1, 2, 3, 4, 5, 6, 7, 8, 0], max_new_tokens=1)
    sched.add(y)
    run(sched, model)
    assert y.num_cached_tokens == 4 and y.output_token_ids == alone(y, 32)


def test_requests_that_computed_one_prefix_at_once_both_keep_their_later_blocks_cached():
    """Admitted in one step, a and b both compute the shared system prompt; b's copy joins a's under the key,
    so b's own later blocks stay registered (their parent key names b's block) and a follow-up of b hits them."""
    sched, model = caching(32, 4, 64)
    system = list(range(30, 38))  # 2 full blocks
    a, b = req("a", system + [1, 2, 3, 4, 0], max_new_tokens=1), req("b", system + [5, 6, 7, 8, 0], max_new_tokens=1)
    sched.add(a)
    sched.add(b)
    step(sched, model)
    assert a.num_cached_tokens == b.num_cached_tokens == 0 and sched.pool.num_cached_blocks == 6
    run(sched, model)
    b2 = req("b2", b.prompt_token_ids + [9], max_new_tokens=1)
    sched.add(b2)
    run(sched, model)
    assert b2.num_cached_tokens == 12 and b2.output_token_ids == alone(b2, 64)


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_with_a_weak_key_give_the_same_outputs(seed, monkeypatch):
    """Four distinct keys in all, so nearly every lookup collides: hits must still be genuine (PrefixModel
    checks every slot's prefix) and the pool's invariants hold."""
    def weak_key(parent_hash, token_ids):
        return bytes(31) + bytes([hash_block(parent_hash, token_ids)[0] % 4])

    monkeypatch.setattr(scheduler_module, "hash_block", weak_key)
    rng = random.Random(seed)
    sched, model = caching(rng.choice([8, 12, 40]), 2, 16, max_num_seqs=rng.randint(1, 4),
                           max_num_batched_tokens=rng.randint(2, 16))
    systems = [[rng.randrange(4) for _ in range(rng.randint(2, 10))] for _ in range(3)]
    requests = []
    for i in range(16):
        r = req(i, (rng.choice(systems) + [rng.randrange(4) for _ in range(rng.randint(0, 4))])[:16],
                rng.randint(1, 6))
        requests.append(r)
        sched.add(r)
        for _ in range(rng.randint(0, 3)):
            if sched.has_unfinished():
                step(sched, model)
    run(sched, model)
    assert all(r.output_token_ids == alone(r, 16) for r in requests)
    assert sched.prefix_cache_hits > 0 and sched.pool.num_hash_mismatches > 0


def test_lru_eviction_in_a_tiny_pool_takes_a_prefix_tail_first():
    sched, model = caching(4, 4, 16)  # 16 slots
    a = req("a", list(range(9)), max_new_tokens=1)  # blocks 0, 1 full and cached; block 2 partial
    sched.add(a)
    run(sched, model)
    assert sched.pool.num_cached_blocks == 2 and sched.pool.num_free_blocks == 4
    b = req("b", list(range(50, 59)), max_new_tokens=1)  # 3 blocks: 2 free, 1 evicted
    sched.add(b)
    step(sched, model)
    assert sched.pool.num_evictions == 1
    # a's blocks were freed tail first, so its block 1 was least recently used and went; block 0 stays.
    assert hit(sched, a, 0) is not None and hit(sched, a, 1) is None
    run(sched, model)
    a2 = req("a2", list(range(9)), max_new_tokens=3)
    sched.add(a2)
    run(sched, model)
    assert a2.num_cached_tokens == 4 and a2.output_token_ids == alone(a2, 16)


@pytest.mark.parametrize("seed", range(12))
def test_hits_give_the_same_outputs_as_misses(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    max_model_len = rng.randint(16, 48)
    # Tight pools preempt and evict; ample ones keep every prefix.
    num_blocks = -(-max_model_len // block_size) + rng.choice([0, 2, 8, 200])
    sched, model = caching(num_blocks, block_size, max_model_len, max_num_seqs=rng.randint(1, 6),
                           max_num_batched_tokens=rng.randint(1, 40))
    systems = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, max_model_len - 1))] for _ in range(3)]
    requests = []
    for i in range(rng.randint(4, 16)):
        prompt = (rng.choice(systems) + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 8))])[:max_model_len]
        r = req(i, prompt, rng.randint(1, 20), min_new_tokens=rng.randint(0, 3),
                eos_token_ids=frozenset(rng.sample(range(VOCAB), 8)), ignore_eos=rng.random() < 0.3)
        requests.append(r)
        sched.add(r)
        if rng.random() < 0.5:  # arrive while others run, so some find their prefix cached
            for _ in range(rng.randint(1, 6)):
                if sched.has_unfinished():
                    step(sched, model)
    run(sched, model)
    for r in requests:
        assert r.is_finished and r.output_token_ids == alone(r, max_model_len)
    assert sched.prefix_cache_queries > 0


def test_hits_happen_in_a_repeated_workload():
    sched, model = caching(64, 4, 64, max_num_batched_tokens=16)
    system = list(range(20, 40))
    for round_ in range(3):
        rs = [req(f"{round_}.{i}", system + [i, round_], max_new_tokens=3) for i in range(4)]
        for r in rs:
            sched.add(r)
        run(sched, model)
        assert all(r.output_token_ids == alone(r, 64) for r in rs)
    # From round 1 on every request finds the 20-token system prompt (5 blocks) cached; the chunked
    # prefill (16 tokens a step) of round 0 lets later requests of that round hit too.
    assert sched.prefix_cache_hits >= 8 * 20
    assert 0 < sched.stats()["prefix_cache_hit_rate"] < 1


def test_no_leaks_after_random_operations():
    rng = random.Random(7)
    sched, model = caching(12, 2, 16, max_num_seqs=4, max_num_batched_tokens=10)
    systems = [[rng.randrange(VOCAB) for _ in range(rng.randint(2, 9))] for _ in range(4)]
    live: list[Request] = []
    pending = None  # a scheduled step not yet applied, to abort/finish requests in between
    n = 0
    for _ in range(1000):
        op = rng.random()
        if op < 0.25:
            r = req(n, (rng.choice(systems) + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 5))])[:16],
                    rng.randint(1, 10))
            n += 1
            sched.add(r)
            live.append(r)
        elif op < 0.35 and live:
            r = rng.choice(live)
            assert sched.abort(r.request_id) is r and r.finish_reason == "abort" and r.block_table is None
        elif op < 0.4 and live:
            sched.finish(rng.choice(live), "stop")
        elif pending is None and sched.has_unfinished():
            pending = sched.schedule()
            sampled = model.step(pending)
        elif pending is not None:
            sched.update(pending, sampled)
            pending = None
        live = [r for r in live if not r.is_finished]
        check_pool(sched)
    for r in live:
        sched.abort(r.request_id)
    pool = sched.pool
    assert not sched.has_unfinished() and not any(pool.ref_counts) and pool.num_free_blocks == pool.num_blocks
    assert all(r.status is RequestStatus.FINISHED for r in live)
    assert sched.prefix_cache_hits > 0 and pool.num_evictions > 0
    assert sched.stats()["kv_blocks_used"] == 0 and sched.stats()["kv_blocks_free"] == 12
