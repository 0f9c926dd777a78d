"""In-flight batching: which tokens of which requests the model computes each step. Pure Python, no torch.

One step, `schedule()` then `update()`:
1. Running requests, oldest first, each get their next tokens (the last sampled token when decoding, the
   next piece of the prompt when a prefill was split), within `max_num_batched_tokens`. A request that needs
   a new block when none is free preempts the newest running request (possibly itself): its blocks are
   freed and it waits to be recomputed from its prompt and the tokens it generated so far.
2. If nothing was preempted, waiting requests are admitted oldest first while `max_num_seqs`, the token
   budget and free blocks for their whole known token list allow. A prompt longer than the budget left is
   computed in pieces over several steps (chunked prefill).
3. The runner computes the chunks and samples a token for each chunk that reaches its request's last known
   token; `update()` appends them, advances the requests and finishes those that stop.

With `enable_prefix_caching`, a request admitted in step 2 first takes the longest run of its leading full
blocks that are already in the pool's prefix cache (same chained SHA-256 key, and the pool checked that the
block's token ids and parent key are the request's) and starts computing after them; `update()` registers
each block that became full and computed, as long as the one before it is registered. Shared blocks are never
written: only full blocks are registered, and a request always computes at least its last known token itself.

Progress is guaranteed: the pool holds, or may grow to, at least `max_model_len` tokens (checked when the scheduler is
built), so the oldest running request, or the oldest waiting one when none runs, always fits (a pool that cannot grow
for lack of device memory makes `schedule()` raise, saying so, rather than wait forever).

Asynchronous scheduling (the engine's `async_scheduling`): `update_pending()` records a computed step before its
tokens are known. Each request that sampled gets a pending token (a `PLACEHOLDER` in its token list, which the
runner replaces on the device with the sampled token), so the next step can be scheduled and launched while the
GPU still samples this one; `resolve()` appends the real tokens later and applies the stop rules. A request
whose pending token already reaches its length limit is not scheduled again (`stop_pending`).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from fastllm.runtime.kv_cache import BlockPool, BlockTable, OutOfBlocks, blocks_needed, hash_block

FINISH_REASONS = ("length", "stop", "abort")
PLACEHOLDER = -1  # a pending token's id in a chunk: the runner feeds the previous step's sampled token


class NoRoomForRequest(RuntimeError):
    """`schedule()` can run nothing: `request`, the oldest unfinished request (every other one is newer and was
    preempted or waits behind it), does not fit in the KV cache even alone, because the cache could not grow to its
    cap (device memory is short). The caller must end it, or every later step fails the same way."""

    def __init__(self, message: str, request: Request | None) -> None:
        super().__init__(message)
        self.request = request


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # waiting to be recomputed; holds no blocks
    FINISHED = enum.auto()


@dataclass(eq=False)  # identity comparison: requests live in queues and are removed by identity
class Request:
    request_id: str | int
    prompt_token_ids: list[int]
    max_new_tokens: int
    min_new_tokens: int = 0
    eos_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    # State, owned by the scheduler.
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # positions whose K/V are in the cache
    block_table: BlockTable | None = None
    finish_reason: str | None = None
    arrival_index: int = -1  # FCFS order, set by Scheduler.add
    num_cached_tokens: int = 0  # prefix-cache hit at the last admission, in tokens
    block_hashes: list[bytes] = field(default_factory=list)  # chained keys of its full blocks (prefix caching)
    num_pending: int = 0  # sampled tokens not known yet (asynchronous scheduling), after output_token_ids
    stop_pending: bool = False  # its pending token ends it by length: not scheduled again

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """`all_token_ids[start:end]` without building the whole list (decode steps take one token)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            tokens = self.output_token_ids[start - n:end - n]
        else:
            tokens = self.prompt_token_ids[start:end] + self.output_token_ids[:max(end - n, 0)]
        return tokens + [PLACEHOLDER] * (end - start - len(tokens))


@dataclass
class ScheduledChunk:
    """Positions [start, start + num_tokens) of one request, computed this step."""

    request: Request
    start: int
    num_tokens: int
    token_ids: list[int]
    slots: list[int]  # cache slot of each position's K/V
    samples: bool  # the chunk ends at the request's last known token: sample from its last position's logits


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Request]  # preempted this step (their blocks are already free)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    """FCFS in-flight batching over a `BlockPool`.

    Args:
        pool: the KV-cache blocks; must hold at least `max_model_len` tokens so any single request fits.
        max_num_seqs: most requests running (holding blocks) at once.
        max_num_batched_tokens: most positions computed in one step, over all requests.
        max_model_len: most positions a request computes. A request finishes with "length" when it holds
            `max_model_len` tokens (or, if its prompt is exactly that long, after its first new token).
        enable_prefix_caching: reuse the K/V of full blocks that earlier requests computed for the same prefix.
    """

    def __init__(self, pool: BlockPool, *, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 max_model_len: int, enable_prefix_caching: bool = False) -> None:
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_model_len", max_model_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        capacity = pool.max_num_blocks * pool.block_size  # a growing pool counts at its cap
        if capacity < max_model_len:
            raise ValueError(f"the KV cache holds at most {capacity} tokens ({pool.max_num_blocks} blocks of "
                             f"{pool.block_size}), fewer than max_model_len={max_model_len}: a long request could "
                             f"never run; lower max_model_len or give the cache more memory")
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.requests: dict[str | int, Request] = {}  # unfinished, by id
        # Every running request arrived before every waiting one (admission is strict FCFS and preemption
        # takes the newest running request), so both stay in arrival order by appending at the ends.
        self.waiting: deque[Request] = deque()  # WAITING and PREEMPTED
        self.running: list[Request] = []
        self._num_arrived = 0
        self.enable_prefix_caching = bool(enable_prefix_caching)
        # Cumulative counters for stats().
        self.num_preemptions = 0
        self.tokens_scheduled = 0
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of which found cached

    def add(self, request: Request) -> None:
        """Queue a new request. Raises ValueError (and adds nothing) if it is malformed or cannot run."""
        r = request
        if r.request_id in self.requests:
            raise ValueError(f"request id {r.request_id!r} is already in the scheduler")
        if r.status is not RequestStatus.WAITING or r.output_token_ids or r.block_table is not None:
            raise ValueError(f"request {r.request_id!r} is not new (status {r.status.name})")
        if len(r.prompt_token_ids) == 0:
            raise ValueError(f"request {r.request_id!r} has an empty prompt")
        if len(r.prompt_token_ids) > self.max_model_len:
            raise ValueError(f"request {r.request_id!r}: prompt of {len(r.prompt_token_ids)} tokens is longer than "
                             f"max_model_len={self.max_model_len}")
        for name, value, minimum in (("max_new_tokens", r.max_new_tokens, 1), ("min_new_tokens", r.min_new_tokens, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"request {r.request_id!r}: {name} must be an integer >= {minimum}, got {value!r}")
        r.prompt_token_ids = list(r.prompt_token_ids)
        r.eos_token_ids = frozenset(r.eos_token_ids)
        r.arrival_index = self._num_arrived
        self._num_arrived += 1
        self.requests[r.request_id] = r
        self.waiting.append(r)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks. Non-empty whenever a request is unfinished (else NoRoomForRequest says why)."""
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING or req.stop_pending:  # preempted this step / ending
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._reserve(req, req.num_computed_tokens + n, preempted):
                break  # req was the newest left and preempted itself
            chunks.append(self._chunk(req, n))
            budget -= n
        while not preempted and self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]
            if not self._admit(req):
                break  # strict FCFS: later requests wait behind it
            self.waiting.popleft()
            self.running.append(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            chunks.append(self._chunk(req, n))
            budget -= n
        self.num_preemptions += len(preempted)
        if not chunks and self.requests and not any(r.stop_pending for r in self.running):
            head = self.waiting[0] if self.waiting else None
            raise NoRoomForRequest(
                f"scheduler cannot make progress: {len(self.running)} running, {len(self.waiting)} waiting, "
                f"{self.pool.num_free_blocks}/{self.pool.num_blocks} blocks free"
                + (f"; request {head.request_id!r} needs {head.num_tokens} token slots" if head else "")
                + (f"; the KV cache could not grow to its cap of {self.pool.max_num_blocks} blocks "
                   "(device memory is short: free some, or set num_kv_tokens)"
                   if self.pool.num_blocks < self.pool.max_num_blocks else ""), head)
        self.tokens_scheduled += sum(c.num_tokens for c in chunks)
        return SchedulerOutput(chunks, preempted)

    def update(self, output: SchedulerOutput, sampled: dict[str | int, int]) -> list[Request]:
        """Record a computed step: `sampled` maps request id -> new token for each chunk that `samples`.

        Returns the requests that finished (their blocks are already free). Chunks of requests finished or
        aborted since `schedule()` are ignored. Raises, changing nothing, on a sampled token missing or an
        output applied twice.
        """
        live = self._live_chunks(output)
        for c in live:
            if c.samples and c.request.request_id not in sampled:
                raise KeyError(f"no sampled token for request {c.request.request_id!r}, whose chunk samples")
        finished = []
        for c in live:
            self._advance(c)
            if c.samples and self._append_token(c.request, sampled[c.request.request_id]):
                finished.append(c.request)
        return finished

    def update_pending(self, output: SchedulerOutput) -> None:
        """Record a computed step whose sampled tokens are not known yet (asynchronous scheduling): each chunk
        that samples leaves a pending token. `resolve()` with the same output supplies them."""
        for c in self._live_chunks(output):
            self._advance(c)
            req = c.request
            if c.samples:
                req.num_pending += 1
                if (len(req.output_token_ids) + req.num_pending >= req.max_new_tokens
                        or req.num_tokens >= self.max_model_len):
                    req.stop_pending = True

    def resolve(self, output: SchedulerOutput, sampled: dict[str | int, int]) -> list[Request]:
        """The tokens of a step recorded by `update_pending()`: append them (requests finished or aborted since
        are skipped) and apply the stop rules. Returns the requests that finished."""
        finished = []
        for c in output.chunks:
            req = c.request
            if not c.samples or req.is_finished or req.num_pending == 0:
                continue
            req.num_pending -= 1
            if self._append_token(req, sampled[req.request_id]):
                finished.append(req)
        return finished

    def forget_pending(self, output: SchedulerOutput) -> None:
        """The tokens of a step recorded by `update_pending()` will never be read (the step after it failed, and the
        step in flight was dropped). Each request that goes on, one preempted in the failed step's scheduling for
        instance, gives its pending token back and will compute its last known token again to sample it anew:
        otherwise its next step would ask for a token that no step in flight holds."""
        for c in output.chunks:
            req = c.request
            if c.samples and not req.is_finished and req.num_pending:
                req.num_pending -= 1
                req.stop_pending = False
                req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)

    def _live_chunks(self, output: SchedulerOutput) -> list[ScheduledChunk]:
        """The chunks of requests still running, each checked to start where its request's computed tokens end
        (so an output applied twice raises before anything changes)."""
        live = [c for c in output.chunks if c.request.status is RequestStatus.RUNNING]
        for c in live:
            req = c.request
            if c.start != req.num_computed_tokens:
                raise RuntimeError(f"request {req.request_id!r}: chunk starts at {c.start} but "
                                   f"{req.num_computed_tokens} tokens are computed (was this output applied twice?)")
        return live

    def _advance(self, chunk: ScheduledChunk) -> None:
        req = chunk.request
        req.num_computed_tokens += chunk.num_tokens
        if self.enable_prefix_caching:
            # Every computed position's token is known, with async scheduling too: a pending token is computed
            # only by the step after the one that sampled it, which is resolved before that step is recorded.
            self._cache_blocks(req, chunk.start)

    def _append_token(self, req: Request, token: int) -> bool:
        """Append a sampled token and apply the stop rules; True if that finished the request."""
        req.output_token_ids.append(token)
        reason = self._stop_reason(req, token)
        if reason is not None:
            self.finish(req, reason)
        return reason is not None

    def finish(self, request: Request, reason: str) -> None:
        """Finish a request now (stop string, client gone, ...) and free its blocks. No-op if already finished."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        if request.is_finished:
            return
        if self.requests.get(request.request_id) is not request:
            raise ValueError(f"request {request.request_id!r} is not in this scheduler")
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._release(request)
        request.status, request.finish_reason = RequestStatus.FINISHED, reason
        del self.requests[request.request_id]

    def abort(self, request_id: str | int) -> Request | None:
        """Finish a request with reason "abort". Returns it, or None if no unfinished request has this id."""
        request = self.requests.get(request_id)
        if request is not None:
            self.finish(request, "abort")
        return request

    def stats(self) -> dict:
        """Plain-data metrics: queue sizes, cumulative counters, block usage, prefix-cache hit rate (in tokens;
        None when prefix caching is off, 0.0 before the first admission), and prefix-cache key mismatches (a
        key found holding other tokens: should stay 0 with SHA-256 keys; otherwise a bug or an attack)."""
        rate = None
        if self.enable_prefix_caching:
            rate = self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        free = self.pool.num_free_blocks
        return dict(num_running=len(self.running), num_waiting=len(self.waiting),
                    num_preemptions=self.num_preemptions, kv_blocks_used=self.pool.num_blocks - free,
                    kv_blocks_free=free, prefix_cache_hit_rate=rate, prefix_cache_queries=self.prefix_cache_queries,
                    prefix_cache_hits=self.prefix_cache_hits,
                    prefix_cache_hash_mismatches=self.pool.num_hash_mismatches, tokens_scheduled=self.tokens_scheduled)

    def _admit(self, req: Request) -> bool:
        """Give a waiting request a block table for its whole known token list (so a split prefill cannot stall),
        starting with the cached blocks of its prefix. Returns False, changing nothing, if the blocks are short."""
        pool, bs = self.pool, self.pool.block_size
        hits = self._cached_prefix(req) if self.enable_prefix_caching else []
        # Evictable hits count as free blocks now but stop being free once taken.
        missing = blocks_needed(req.num_tokens, bs) - len(hits) + sum(pool.ref_counts[b] == 0 for b in hits)
        if not pool.can_allocate(missing):
            return False
        pool.incref(hits)
        table = BlockTable(pool)
        table.blocks, table.num_tokens = list(hits), len(hits) * bs
        table.ensure_capacity(req.num_tokens)
        req.block_table, req.status = table, RequestStatus.RUNNING
        req.num_computed_tokens = req.num_cached_tokens = len(hits) * bs
        if self.enable_prefix_caching:
            self.prefix_cache_queries += req.num_tokens
            self.prefix_cache_hits += req.num_cached_tokens
        return True

    def _cached_prefix(self, req: Request) -> list[int]:
        """The cached blocks holding the request's leading full blocks, up to the first miss. The pool serves a
        block only if its token ids and parent key are the request's, so a colliding key is a miss."""
        bs, hits = self.pool.block_size, []
        # At most (num_tokens - 1) // bs blocks: the last token is always computed, for its logits, and so the
        # block being written is never a shared one.
        for i, h in enumerate(self._hashes(req, (req.num_tokens - 1) // bs)):
            b = self.pool.lookup(h, req.block_hashes[i - 1] if i else None, req.token_ids(i * bs, (i + 1) * bs))
            if b is None:
                break
            hits.append(b)
        return hits

    def _hashes(self, req: Request, num_blocks: int) -> list[bytes]:
        """Chained keys of the request's first `num_blocks` full blocks (memoized on the request: content only,
        so they survive preemption)."""
        bs, hashes = self.pool.block_size, req.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, req.token_ids(i * bs, (i + 1) * bs)))
        return hashes[:num_blocks]

    def _cache_blocks(self, req: Request, start: int) -> None:
        """Register the blocks that a chunk from `start` to `num_computed_tokens` completed.

        A block is registered only while the one before it in the table is registered under the request's
        previous key: after a collision (the pool refused a block) the later blocks' K/V were computed after
        content their parent key does not name, so they stay private (see `BlockPool`).
        """
        pool, bs, blocks = self.pool, self.pool.block_size, req.block_table.blocks
        first, end = start // bs, req.num_computed_tokens // bs
        if first == end:  # most decode steps: no block completed (and no copy of the key list)
            return
        hashes = self._hashes(req, end)
        for i in range(first, end):
            parent = hashes[i - 1] if i else None
            if i and pool.block_hashes[blocks[i - 1]] != parent:
                return
            pool.cache(blocks[i], hashes[i], parent, req.token_ids(i * bs, (i + 1) * bs))

    def _stop_reason(self, req: Request, token: int) -> str | None:
        num_new = len(req.output_token_ids)
        if not req.ignore_eos and num_new > req.min_new_tokens and token in req.eos_token_ids:
            return "stop"
        if num_new >= req.max_new_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _reserve(self, req: Request, num_tokens: int, preempted: list[Request]) -> bool:
        """Give `req` slots for [0, num_tokens), preempting the newest running requests until they fit.

        Returns False if `req` itself had to be preempted.
        """
        while True:
            try:
                req.block_table.ensure_capacity(num_tokens)
                return True
            except OutOfBlocks:
                victim = self.running.pop()
                self._release(victim)
                victim.status, victim.num_computed_tokens = RequestStatus.PREEMPTED, 0
                self.waiting.appendleft(victim)  # victims come newest first, so the queue stays in arrival order
                preempted.append(victim)
                if victim is req:
                    return False

    def _release(self, req: Request) -> None:
        if req.block_table is not None:
            req.block_table.free()
            req.block_table = None

    @staticmethod
    def _chunk(req: Request, n: int) -> ScheduledChunk:
        start, end = req.num_computed_tokens, req.num_computed_tokens + n
        return ScheduledChunk(req, start, n, req.token_ids(start, end), req.block_table.slots(start, end),
                              samples=end == req.num_tokens)
