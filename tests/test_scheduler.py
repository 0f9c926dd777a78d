"""The scheduler, driven by a fake model that stores tokens in the paged cache's slots instead of K/V.

The fake model writes each chunk's tokens into a flat "cache" at the chunk's slots, then samples
`next_token(context)`, where the context is read back through the request's block table. Any slot mix-up
(overlapping slots, stale blocks after preemption, a wrong block table) changes the context and so the output.
"""

import random
import subprocess
import sys
from pathlib import Path

import pytest

from fastllm.runtime.kv_cache import BlockPool
from fastllm.runtime.scheduler import PLACEHOLDER, Request, RequestStatus, Scheduler, SchedulerOutput

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 97


def next_token(token_ids: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(token_ids)) * 31 + len(token_ids)) % VOCAB


class FakeModel:
    def __init__(self, pool: BlockPool) -> None:
        self.cache: list[int | None] = [None] * (pool.num_blocks * pool.block_size)

    def step(self, out: SchedulerOutput) -> dict:
        slots = [s for c in out.chunks for s in c.slots]
        assert len(set(slots)) == len(slots), "two positions share a slot"
        for c in out.chunks:
            assert len(c.slots) == len(c.token_ids) == c.num_tokens > 0
            for slot, token in zip(c.slots, c.token_ids):
                self.cache[slot] = token
        sampled = {}
        for c in out.chunks:
            if c.samples:
                context = [self.cache[s] for s in c.request.block_table.slots(0, c.start + c.num_tokens)]
                assert context == c.request.all_token_ids
                sampled[c.request.request_id] = next_token(context)
        return sampled


def check_invariants(sched: Scheduler, out: SchedulerOutput) -> None:
    assert not out.is_empty
    assert len(out.chunks) <= sched.max_num_seqs and len(sched.running) <= sched.max_num_seqs
    assert 0 < out.num_tokens <= sched.max_num_batched_tokens
    order = [r.arrival_index for r in sched.running] + [r.arrival_index for r in sched.waiting]
    assert order == sorted(order), "running, then waiting, in arrival order"
    assert all(r.status is RequestStatus.RUNNING for r in sched.running)
    assert all(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) and r.block_table is None
               for r in sched.waiting)
    held = sum(len(r.block_table.blocks) for r in sched.running)
    assert held == sched.pool.num_blocks - sched.pool.num_free_blocks


def run(sched: Scheduler, model: FakeModel | None = None, max_steps: int = 10_000) -> dict:
    """Step until every request finished; returns stats."""
    model = model or FakeModel(sched.pool)
    stats = dict(steps=0, preempted=0, finished=[])
    while sched.has_unfinished():
        out = sched.schedule()
        check_invariants(sched, out)
        stats["finished"] += sched.update(out, model.step(out))
        stats["steps"] += 1
        stats["preempted"] += len(out.preempted)
        assert stats["steps"] < max_steps
    assert sched.schedule().is_empty
    assert sched.pool.num_free_blocks == sched.pool.num_blocks and not any(sched.pool.ref_counts)
    return stats


def req(rid, prompt, max_new_tokens, **kwargs) -> Request:
    return Request(rid, list(prompt), max_new_tokens, **kwargs)


def alone(request: Request, max_model_len: int) -> list[int]:
    """The request's output when it runs by itself in an ample pool."""
    sched = Scheduler(BlockPool(256, 4), max_model_len=max_model_len)
    copy = req(request.request_id, request.prompt_token_ids, request.max_new_tokens,
               min_new_tokens=request.min_new_tokens, eos_token_ids=request.eos_token_ids,
               ignore_eos=request.ignore_eos)
    sched.add(copy)
    run(sched)
    return copy.output_token_ids


def test_single_request_prefill_decode_finish():
    pool = BlockPool(num_blocks=8, block_size=4)
    sched = Scheduler(pool, max_model_len=32)
    r = req("a", range(1, 11), max_new_tokens=5)
    sched.add(r)
    model = FakeModel(pool)

    out = sched.schedule()
    (c,) = out.chunks
    assert (c.start, c.num_tokens, c.token_ids, c.samples) == (0, 10, list(range(1, 11)), True)
    assert c.slots == r.block_table.slots(0, 10) and len(r.block_table.blocks) == 3
    assert sched.update(out, model.step(out)) == []
    assert r.num_computed_tokens == 10 and len(r.output_token_ids) == 1

    for i in range(4):
        out = sched.schedule()
        (c,) = out.chunks
        assert (c.start, c.num_tokens, c.token_ids, c.samples) == (10 + i, 1, [r.output_token_ids[-1]], True)
        finished = sched.update(out, model.step(out))
    assert finished == [r] and r.finish_reason == "length" and r.is_finished
    assert len(r.output_token_ids) == 5 and r.num_tokens == 15
    assert r.block_table is None and pool.num_free_blocks == 8
    assert not sched.has_unfinished() and sched.schedule().is_empty
    expected = list(range(1, 11))
    for _ in range(5):
        expected.append(next_token(expected))
    assert r.all_token_ids == expected


def _feed(sched: Scheduler, r: Request, tokens: list[int]) -> list[Request]:
    """Sample `tokens` one step at a time until the request finishes."""
    for t in tokens:
        finished = sched.update(sched.schedule(), {r.request_id: t})
        if finished:
            return finished
    return []


@pytest.mark.parametrize("min_new_tokens, ignore_eos, output, reason", [
    (0, False, [5, 9], "stop"),          # eos ends it and is kept in the output
    (2, False, [9, 9, 9], "stop"),       # eos only counts once min_new_tokens are out
    (0, True, [9, 9, 9, 9], "length"),   # ignore_eos: max_new_tokens ends it
    (0, False, [5, 5, 5, 11], "stop"),   # eos as the last allowed token: "stop", not "length"
])
def test_eos(min_new_tokens, ignore_eos, output, reason):
    sched = Scheduler(BlockPool(8, 4), max_model_len=32)
    r = req(0, [1, 2, 3], max_new_tokens=4, min_new_tokens=min_new_tokens, eos_token_ids=frozenset({9, 11}),
            ignore_eos=ignore_eos)
    sched.add(r)
    assert _feed(sched, r, output) == [r]  # finishes on the last token fed, not before
    assert r.output_token_ids == output and r.finish_reason == reason
    assert sched.pool.num_free_blocks == 8


def test_max_model_len_caps_generation():
    sched = Scheduler(BlockPool(8, 4), max_model_len=12)
    short, full = req("short", range(8), max_new_tokens=100), req("full", range(12), max_new_tokens=100)
    sched.add(short)
    sched.add(full)
    run(sched)
    assert short.num_tokens == 12 and short.finish_reason == "length"
    # A prompt of exactly max_model_len still yields one token: its K/V is never computed.
    assert len(full.output_token_ids) == 1 and full.finish_reason == "length"


def test_many_requests_respect_limits_and_match_running_alone():
    rng = random.Random(0)
    requests = [req(i, [rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))], rng.randint(1, 12))
                for i in range(30)]
    sched = Scheduler(BlockPool(128, 4), max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64)
    for r in requests:
        sched.add(r)
    stats = run(sched)  # checks the limits every step
    assert sorted(r.request_id for r in stats["finished"]) == list(range(30))
    for r in requests:
        assert r.finish_reason == "length" and len(r.output_token_ids) == r.max_new_tokens
        assert r.output_token_ids == alone(r, 64)


def test_chunked_prefill():
    sched = Scheduler(BlockPool(32, 4), max_num_batched_tokens=8, max_model_len=64)
    a = req("a", range(25), max_new_tokens=3)
    sched.add(a)
    model = FakeModel(sched.pool)
    shapes = []
    while not a.output_token_ids:
        out = sched.schedule()
        (c,) = out.chunks
        shapes.append((c.start, c.num_tokens, c.samples))
        assert c.token_ids == list(range(c.start, c.start + c.num_tokens))
        sched.update(out, model.step(out))
    assert shapes == [(0, 8, False), (8, 8, False), (16, 8, False), (24, 1, True)]
    assert len(a.block_table.blocks) == 7  # the whole prompt was reserved at admission

    # A decoding request takes its token first; a new prompt gets the rest of the budget.
    b = req("b", range(50, 70), max_new_tokens=2)
    sched.add(b)
    out = sched.schedule()
    assert [(c.request.request_id, c.start, c.num_tokens, c.samples) for c in out.chunks] == [
        ("a", 25, 1, True), ("b", 0, 7, False)]
    sched.update(out, model.step(out))
    out = sched.schedule()
    assert [(c.request.request_id, c.start, c.num_tokens, c.samples) for c in out.chunks] == [
        ("a", 26, 1, True), ("b", 7, 7, False)]
    sched.update(out, model.step(out))
    run(sched, model)
    assert a.output_token_ids == alone(a, 64) and b.output_token_ids == alone(b, 64)


def test_preemption_in_a_tiny_pool_gives_the_same_outputs():
    pool = BlockPool(num_blocks=6, block_size=4)  # 24 token slots for 8 requests growing to 24 tokens each
    sched = Scheduler(pool, max_model_len=24)
    requests = [req(i, [(7 * i + j) % VOCAB for j in range(3 + i)], max_new_tokens=14) for i in range(8)]
    for r in requests:
        sched.add(r)
    stats = run(sched)
    assert stats["preempted"] > 0
    for r in requests:
        assert r.is_finished and r.finish_reason == "length"
        assert r.output_token_ids == alone(r, 24)


@pytest.mark.parametrize("seed", range(20))
def test_random_workloads_match_running_alone(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 16])
    max_model_len = rng.randint(8, 48)
    pool = BlockPool(-(-max_model_len // block_size) + rng.randint(0, 3), block_size)  # tight: preempts
    sched = Scheduler(pool, max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(1, 40),
                      max_model_len=max_model_len)
    requests = []
    for i in range(rng.randint(1, 12)):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_model_len))]
        r = req(i, prompt, rng.randint(1, 30), min_new_tokens=rng.randint(0, 3),
                eos_token_ids=frozenset(rng.sample(range(VOCAB), 8)), ignore_eos=rng.random() < 0.3)
        requests.append(r)
        sched.add(r)
    run(sched)
    for r in requests:
        assert r.is_finished and r.output_token_ids == alone(r, max_model_len)


def test_abort_and_finish_free_blocks_at_once():
    pool = BlockPool(16, 4)
    sched = Scheduler(pool, max_num_seqs=2, max_model_len=64)
    a, b, c = (req(x, range(10), max_new_tokens=50) for x in "abc")
    for r in (a, b, c):
        sched.add(r)
    model = FakeModel(pool)
    out = sched.schedule()
    sched.update(out, model.step(out))
    assert a.status is b.status is RequestStatus.RUNNING and c.status is RequestStatus.WAITING

    assert sched.abort("a") is a
    assert a.finish_reason == "abort" and a.block_table is None and pool.num_free_blocks == 16 - 3
    assert sched.abort("a") is None and sched.abort("nobody") is None
    assert sched.abort("c") is c and c.is_finished  # a waiting request

    out = sched.schedule()  # b decodes
    sampled = model.step(out)
    sched.finish(b, "stop")  # e.g. the client went away between schedule() and update()
    assert pool.num_free_blocks == 16
    assert sched.update(out, sampled) == []  # the finished request's chunk is ignored
    assert b.output_token_ids and len(b.output_token_ids) == 1 and b.finish_reason == "stop"
    assert not sched.has_unfinished()
    with pytest.raises(ValueError, match="finish reason"):
        sched.finish(b, "done")


@pytest.mark.parametrize("bad, match", [
    (dict(prompt=[]), "empty prompt"),
    (dict(prompt=list(range(17))), "longer than max_model_len=16"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(rid="taken"), "already in the scheduler"),
])
def test_bad_requests_raise_and_leave_the_scheduler_usable(bad, match):
    sched = Scheduler(BlockPool(8, 4), max_model_len=16)
    taken = req("taken", [1, 2], max_new_tokens=1)
    sched.add(taken)
    args = dict(rid="new", prompt=[1, 2, 3], max_new_tokens=2, min_new_tokens=0) | bad
    with pytest.raises(ValueError, match=match):
        sched.add(req(args["rid"], args["prompt"], args["max_new_tokens"], min_new_tokens=args["min_new_tokens"]))
    assert list(sched.requests) == ["taken"] and len(sched.waiting) == 1
    good = req("good", [4, 5], max_new_tokens=3)
    sched.add(good)
    run(sched)
    assert len(good.output_token_ids) == 3 and taken.is_finished
    with pytest.raises(ValueError, match="not new"):
        sched.add(good)


def test_scheduler_arguments():
    with pytest.raises(ValueError, match="holds at most 32 tokens .* fewer than max_model_len=33"):
        Scheduler(BlockPool(8, 4), max_model_len=33)
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(BlockPool(8, 4), max_num_seqs=0, max_model_len=8)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(BlockPool(8, 4), max_num_batched_tokens=0, max_model_len=8)


def test_no_progress_is_reported_not_hung():
    pool = BlockPool(4, 4)
    sched = Scheduler(pool, max_model_len=16)
    outside = pool.allocate(4)  # another owner holds the whole pool
    sched.add(req("a", [1, 2], max_new_tokens=2))
    with pytest.raises(RuntimeError, match="cannot make progress.*0/4 blocks free"):
        sched.schedule()
    pool.free(outside)
    run(sched)


def test_update_misuse_raises():
    sched = Scheduler(BlockPool(8, 4), max_model_len=16)
    sched.add(req("a", [1, 2], max_new_tokens=3))
    out = sched.schedule()
    with pytest.raises(KeyError, match="no sampled token"):
        sched.update(out, {})
    out = sched.schedule()
    sched.update(out, {"a": 5})
    with pytest.raises(RuntimeError, match="applied twice"):
        sched.update(out, {"a": 5})


def test_scheduler_imports_without_torch():
    # `import fastllm` itself imports torch (optimize, kernels), so the parent package is stubbed: what is
    # checked is that fastllm.runtime, .scheduler and .kv_cache's block accounting never import torch.
    code = f"""
import sys, types
sys.modules["torch"] = None  # any `import torch` now raises ImportError
pkg = types.ModuleType("fastllm")
pkg.__path__ = [{str(REPO_ROOT / "fastllm")!r}]
sys.modules["fastllm"] = pkg
from fastllm.runtime.kv_cache import BlockPool
from fastllm.runtime.scheduler import Request, Scheduler
sched = Scheduler(BlockPool(4, 4), max_model_len=16)
r = Request("a", [1, 2, 3], max_new_tokens=2)
sched.add(r)
while sched.has_unfinished():
    sched.update(sched.schedule(), {{"a": 7}})
assert r.output_token_ids == [7, 7]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _held(sched: Scheduler) -> set[int]:
    return {b for b, c in enumerate(sched.pool.ref_counts) if c}


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("state", ["waiting", "chunked_prefill", "decoding", "preempted", "between_steps"])
def test_abort_in_every_state_frees_blocks_at_once(state, caching):
    pool = BlockPool(8, 4)  # 32 slots
    sched = Scheduler(pool, max_num_batched_tokens=8, max_model_len=32, enable_prefix_caching=caching)
    model = FakeModel(pool)
    old = req("old", range(40, 52), max_new_tokens=20)  # 3 blocks, grows to 8
    sched.add(old)
    if state == "waiting":
        target = old
    else:
        target = req("t", range(10, 30), max_new_tokens=12)  # 20-token prompt: 3 chunks at 8 a step
        sched.add(target)
        out = sched.schedule()
        sched.update(out, model.step(out))
    if state == "chunked_prefill":
        out = sched.schedule()
        sched.update(out, model.step(out))
        assert target.status is RequestStatus.RUNNING and 0 < target.num_computed_tokens < 20
    elif state == "decoding":
        while len(target.output_token_ids) < 2:
            out = sched.schedule()
            sched.update(out, model.step(out))
    elif state == "preempted":
        while target.status is not RequestStatus.PREEMPTED:  # old grows until target must give way
            out = sched.schedule()
            sched.update(out, model.step(out))
        assert target.block_table is None and sched.stats()["num_preemptions"] >= 1
    elif state == "between_steps":
        out = sched.schedule()
        sampled = model.step(out)
        assert any(c.request is target for c in out.chunks)
    others = {b for r in sched.running if r is not target for b in r.block_table.blocks}
    assert sched.abort(target.request_id) is target
    assert target.finish_reason == "abort" and target.is_finished and target.block_table is None
    assert target not in sched.running and target not in sched.waiting and target.request_id not in sched.requests
    assert _held(sched) == others  # the target's blocks were freed at once
    if state == "between_steps":
        sched.update(out, sampled)  # its chunk is ignored
    assert sched.abort(target.request_id) is None
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update(out, model.step(out))
    assert pool.num_free_blocks == 8 and not any(pool.ref_counts)
    if target is not old:
        assert old.output_token_ids == alone(old, 32)


def test_stats():
    pool = BlockPool(6, 4)
    sched = Scheduler(pool, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=24)
    assert sched.stats() == dict(num_running=0, num_waiting=0, num_preemptions=0, kv_blocks_used=0,
                                 kv_blocks_free=6, prefix_cache_hit_rate=None, prefix_cache_queries=0,
                                 prefix_cache_hits=0, prefix_cache_hash_mismatches=0, tokens_scheduled=0)
    for i in range(3):
        sched.add(req(i, range(5), max_new_tokens=19))
    model = FakeModel(pool)
    out = sched.schedule()
    s = sched.stats()
    assert (s["num_running"], s["num_waiting"], s["kv_blocks_used"], s["kv_blocks_free"]) == (2, 1, 4, 2)
    assert s["tokens_scheduled"] == 8 == out.num_tokens  # 5 + 3 of the second prompt
    total = 8
    while sched.has_unfinished():
        sched.update(out, model.step(out))
        out = sched.schedule() if sched.has_unfinished() else None
        total += out.num_tokens if out else 0
    s = sched.stats()
    assert s["tokens_scheduled"] == total and s["num_preemptions"] > 0  # two requests of 24 tokens in 24 slots
    assert (s["num_running"], s["num_waiting"], s["kv_blocks_used"], s["kv_blocks_free"]) == (0, 0, 0, 6)

    sched = Scheduler(BlockPool(6, 4), max_model_len=24, enable_prefix_caching=True)
    model = FakeModel(sched.pool)  # one model: the cache content outlives the requests
    assert sched.stats()["prefix_cache_hit_rate"] == 0.0
    a, b = req("a", range(9), max_new_tokens=1), req("b", range(9), max_new_tokens=1)
    sched.add(a)
    run(sched, model)
    sched.add(b)
    run(sched, model)
    assert b.num_cached_tokens == 8
    assert sched.stats()["prefix_cache_hit_rate"] == 8 / 18 and sched.stats()["prefix_cache_hits"] == 8


# ---- asynchronous scheduling: update_pending() now, resolve() a step later -----------------------------------


class AsyncFakeModel(FakeModel):
    """FakeModel whose pending tokens (PLACEHOLDER in a chunk) are read from the last step's samples, as the
    runner reads them from its device feed buffer."""

    def __init__(self, pool: BlockPool) -> None:
        super().__init__(pool)
        self.feed: dict = {}

    def step(self, out: SchedulerOutput) -> dict:
        sampled = {}
        for c in out.chunks:
            tokens = [self.feed[c.request.request_id] if t == PLACEHOLDER else t for t in c.token_ids]
            for slot, token in zip(c.slots, tokens):
                self.cache[slot] = token
        for c in out.chunks:
            if c.samples:
                context = [self.cache[s] for s in c.request.block_table.slots(0, c.start + c.num_tokens)]
                sampled[c.request.request_id] = next_token(context)
        self.feed = sampled
        return sampled


def run_async(sched: Scheduler, max_steps: int = 10_000) -> int:
    """The engine's asynchronous loop: schedule and run a step, resolve the one before, record this one as
    pending. Returns the steps whose chunks held a pending token."""
    model, previous, fed = AsyncFakeModel(sched.pool), None, 0
    for _ in range(max_steps):
        if not sched.has_unfinished() and previous is None:
            break
        out = sched.schedule() if sched.has_unfinished() else SchedulerOutput([], [])
        fed += any(PLACEHOLDER in c.token_ids for c in out.chunks)
        sampled = model.step(out)
        if previous is not None:
            sched.resolve(*previous)
        sched.update_pending(out)
        previous = (out, sampled) if out.chunks else None
    assert not sched.has_unfinished() and sched.pool.num_free_blocks == sched.pool.num_blocks
    assert not any(r.num_pending for r in sched.requests.values())
    return fed


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_async_scheduling_matches_running_alone(seed, caching):
    """Random tight workloads (preemption, chunked prefill, EOS found a step late, length limits): the same
    outputs and finish reasons as each request alone, no block or pending token left."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 16])
    max_model_len = rng.randint(8, 48)
    pool = BlockPool(-(-max_model_len // block_size) + rng.randint(0, 3), block_size)
    sched = Scheduler(pool, max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(1, 40),
                      max_model_len=max_model_len, enable_prefix_caching=caching)
    requests = []
    shared = [rng.randrange(VOCAB) for _ in range(max_model_len // 2)]  # a common prefix: cache hits
    for i in range(rng.randint(1, 12)):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_model_len))]
        if caching and rng.random() < 0.5:
            prompt = (shared + prompt)[:max_model_len]
        r = req(i, prompt, rng.randint(1, 30), min_new_tokens=rng.randint(0, 3),
                eos_token_ids=frozenset(rng.sample(range(VOCAB), 8)), ignore_eos=rng.random() < 0.3)
        requests.append(r)
        sched.add(r)
    fed = run_async(sched)
    assert fed > 0 or all(r.max_new_tokens == 1 or len(r.output_token_ids) <= 1 for r in requests)
    for r in requests:
        reference = req(r.request_id, r.prompt_token_ids, r.max_new_tokens, min_new_tokens=r.min_new_tokens,
                        eos_token_ids=r.eos_token_ids, ignore_eos=r.ignore_eos)
        ref_sched = Scheduler(BlockPool(256, 4), max_model_len=max_model_len)
        ref_sched.add(reference)
        run(ref_sched)
        assert r.is_finished and r.output_token_ids == reference.output_token_ids
        assert r.finish_reason == reference.finish_reason
