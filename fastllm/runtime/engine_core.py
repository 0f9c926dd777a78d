"""The engine core: one per model. It owns the scheduler, the KV block pool and the model runner; every entry point
(`model.generate()`, `model(...)`, `LLM`, `AsyncLLM`, the server) talks to it, never to them.

    core.add(prompt_token_ids, params, listener=...)   # queue a request (n completions); ValueError if it cannot run
    core.step()                                         # schedule, run and sample one step; updates go to listeners
    core.run_until(lambda: request.finished)            # step until a caller's own requests are done
    core.abort(request_id)

Callers from several threads are served by one fair lock: whoever holds it runs the next step for everyone, so two
threads' requests share batches, and each caller steps until its own requests finish. A request's listener gets
each step's new tokens (and text, with a tokenizer) on the thread that ran the step.

Per step: synchronous (schedule, run, sample, update) or, with `async_scheduling`, overlapped (runtime/overlap.py:
the host schedules and launches step N+1 before reading step N's tokens; rows that need their token history on the
host — penalties, bad words, logprobs — make their step synchronous). A step that raises fails the requests it
touched (their outputs carry the error and `fault`), and the core goes on.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fastllm.kernels.argmax import argmax_rows
from fastllm.runtime.detokenizer import IncrementalDetokenizer
from fastllm.runtime.heap import HeapHold
from fastllm.runtime.kv_cache import BlockTable, OutOfBlocks
from fastllm.runtime.model_runner import ModelRunner
from fastllm.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput, RequestUpdate
from fastllm.runtime.overlap import OverlappedSteps
from fastllm.runtime.sampler import (
    NO_TOKEN,
    NO_TOKEN_ERROR,
    RowContext,
    needs_host_history,
    sample_tokens,
    token_logprobs,
)
from fastllm.runtime.sampling_params import SamplingParams
from fastllm.runtime.scheduler import NoRoomForRequest, Request, Scheduler, SchedulerOutput
from fastllm.runtime.step_inputs import StepInput
from fastllm.runtime.stop_strings import StopStrings

# Upper bounds (seconds) of the latency histogram buckets in `metrics()`; the last bucket is open.
HISTOGRAM_BOUNDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# metrics() keeps the latest samples only, so a long-running engine (the server) does not grow without bound.
MAX_METRIC_SAMPLES = 10_000
# Scheduling settings that `configure()` may change while the core is idle.
SCHEDULING_OPTIONS = ("max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching", "async_scheduling")
# A step whose sampled rows are all plain greedy ones (`_Completion.plain_greedy`) takes the argmax of its logits
# without building a RowContext per row or the sampler's per-row masks and penalties, which at 512 rows cost
# milliseconds of host time a step (benchmarks/bench_host_step.py measures both paths; False: always per row).
PLAIN_ROWS_FAST_PATH = True


class FairLock:
    """A re-entrant lock granted in arrival order. `threading.Lock` is not fair: a thread that releases and takes it
    back in a loop (a step loop) can starve another thread waiting to add a request."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next_ticket = self._serving = 0
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> FairLock:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return self
            ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
            while self._serving != ticket:
                self._cond.wait()
            self._owner, self._depth = me, 1
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner, self._serving = None, self._serving + 1
                self._cond.notify_all()


@dataclass(eq=False)
class _Completion:
    """Core-side state of one completion (one scheduler request)."""

    request: Request
    owner: CoreRequest
    index: int
    generator: torch.Generator | None
    bad_words_token_ids: list[list[int]]
    stop_ids: frozenset[int]               # masked until min_tokens are out
    stop: StopStrings | None
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[dict[int, float]] | None
    scores: list[torch.Tensor] | None      # per step: processed scores [V] (return_scores)
    raw_logits: list[torch.Tensor] | None  # per step: the model's logits [V] (return_scores)
    num_sent: int = 0                      # tokens already handed to the listener
    first_token_time: float | None = None
    stopped_by_string: bool = False
    plain_greedy: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        p = self.owner.params
        # Greedy and nothing that edits or reports its scores, ever: its token is the argmax of its logits (what
        # sample_tokens gives such a row: no mask, no penalty, no warp).
        self.plain_greedy = (p.temperature == 0 and not self.bad_words_token_ids and p.logprobs is None
                             and self.scores is None and (p.min_tokens == 0 or not self.stop_ids)
                             and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty)

    def row(self) -> RowContext:
        r, params = self.request, self.owner.params
        masked = self.stop_ids if len(r.output_token_ids) < params.min_tokens else frozenset()
        return RowContext(params, r.prompt_token_ids, r.output_token_ids, self.generator,
                          self.bad_words_token_ids, masked)


@dataclass(eq=False)
class CoreRequest:
    """One prompt and its `params.n` completions, as the core tracks it. `output` is filled in place."""

    request_id: str
    params: SamplingParams
    output: RequestOutput
    tokenizer: object | None
    listener: Callable[[RequestUpdate], None] | None
    return_scores: bool
    completions: list[_Completion] = field(default_factory=list)
    fault: BaseException | None = None     # the step failure that ended it, if one did
    listener_error: BaseException | None = None  # what its listener raised (generate() re-raises a streamer's own)
    final_update_sent: bool = False

    @property
    def finished(self) -> bool:
        return self.output.finished


class EngineCore:
    """Scheduler + KV pool + model runner of one model, behind one lock.

    Args:
        runner: the model's runner (owns the KV cache and CUDA graphs).
        vocab_size: the model's vocabulary (prompt token ids are checked against it).
        eos_token_ids: ids that end a completion unless `ignore_eos`.
        max_num_seqs, max_num_batched_tokens, enable_prefix_caching, async_scheduling: scheduling settings
            (`configure()` changes them while the core is idle).
    """

    def __init__(self, runner: ModelRunner, *, vocab_size: int, eos_token_ids: frozenset[int] = frozenset(),
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 8192, enable_prefix_caching: bool = False,
                 async_scheduling: bool = True) -> None:
        self.runner = runner
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self._lock = FairLock()
        self._ids = itertools.count()
        self._requests: dict[str, CoreRequest] = {}        # unfinished, by id
        self._completions: dict[str, _Completion] = {}     # unfinished, by scheduler request id
        self.num_generated_tokens = 0
        self.num_finished_requests = 0
        self.num_aborted_requests = 0
        self.num_steps = 0
        self.num_overlapped_steps = 0  # async scheduling: steps whose tokens the host did not wait for
        # Host seconds per phase of the step loop: scheduling, preparing and launching the model step, sampling
        # (which waits for the GPU), and the bookkeeping after.
        self.step_seconds: dict[str, float] = dict.fromkeys(("schedule", "execute", "sample", "update"), 0.0)
        self._ttft: deque[float] = deque(maxlen=MAX_METRIC_SAMPLES)
        self._tpot: deque[float] = deque(maxlen=MAX_METRIC_SAMPLES)
        self.closed = False
        self._heap = HeapHold()  # the objects that exist stay out of the collector's way while this engine steps
        self._make_scheduler(max_num_seqs, max_num_batched_tokens, enable_prefix_caching, async_scheduling)

    def _make_scheduler(self, max_num_seqs: int, max_num_batched_tokens: int, enable_prefix_caching: bool,
                        async_scheduling: bool) -> None:
        if not isinstance(async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True or False, got {async_scheduling!r}")
        # More sequences or step tokens than the cache can hold never run (runner.cache_limits): the caps change no
        # step, only what is sized by them; scheduling_options() reports them. Values other than ints: the
        # Scheduler's error.
        most_seqs, most_tokens = self.runner.cache_limits()
        if type(max_num_seqs) is int:
            max_num_seqs = min(max_num_seqs, most_seqs)
        if type(max_num_batched_tokens) is int:
            max_num_batched_tokens = min(max_num_batched_tokens, most_tokens)
        # A step samples at most one row per sequence and per token; the runner's feed buffer holds one per row.
        capacity = self.runner.feed.shape[0] - 1
        if isinstance(max_num_seqs, int) and isinstance(max_num_batched_tokens, int) \
                and min(max_num_seqs, max_num_batched_tokens) > capacity:
            raise ValueError(f"max_num_seqs={max_num_seqs} and max_num_batched_tokens={max_num_batched_tokens} "
                             f"exceed the runner's {capacity} sampled rows per step; give the larger values to "
                             f"fastllm.optimize()")
        previous = getattr(self, "scheduler", None)
        self.scheduler = Scheduler(self.runner.pool, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens,
                                   max_model_len=self.runner.max_model_len, enable_prefix_caching=enable_prefix_caching)
        if previous is not None:
            # The counters are the core's, cumulative since it was built (metrics(), LLM.num_preemptions): a new
            # scheduler for other settings (another LLM's, on the same model) used to start them from zero again.
            for name in ("num_preemptions", "tokens_scheduled", "prefix_cache_queries", "prefix_cache_hits"):
                setattr(self.scheduler, name, getattr(previous, name))
        self.async_scheduling = async_scheduling
        self._overlap = OverlappedSteps(self.scheduler, self.runner, lambda c: c.request.request_id)

    # ---- settings --------------------------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def scheduling_options(self) -> dict:
        s = self.scheduler
        return dict(max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
                    enable_prefix_caching=s.enable_prefix_caching, async_scheduling=self.async_scheduling)

    def configure(self, **options) -> None:
        """Change scheduling settings (`SCHEDULING_OPTIONS`). Only while no request is in the core."""
        unknown = sorted(set(options) - set(SCHEDULING_OPTIONS))
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; allowed: {', '.join(SCHEDULING_OPTIONS)}")
        with self._lock:
            # A closed core's runner has no buffers left: building a scheduler on it failed with "max_num_seqs=...
            # exceed the runner's -1 sampled rows per step" (an LLM whose model's core another LLM closed).
            self._check_open()
            merged = self.scheduling_options() | options
            if merged == self.scheduling_options():
                return
            if self._requests or self._overlap.inflight is not None:
                raise RuntimeError(f"cannot change {', '.join(sorted(options))} while {len(self._requests)} request(s) "
                                   "run on this model; wait for them to finish")
            self._make_scheduler(**merged)

    # ---- requests --------------------------------------------------------------------------------------------

    def add(self, prompt_token_ids: Sequence[int], params: SamplingParams, *, request_id: str | None = None,
            prompt: str | None = None, tokenizer=None, listener: Callable[[RequestUpdate], None] | None = None,
            return_scores: bool = False, arrival_time: float | None = None,
            eos_token_ids: frozenset[int] | None = None, stop_on_special_tokens_text: bool = False) -> CoreRequest:
        """Queue a request of `params.n` completions. Raises ValueError (adding nothing) if it cannot run: invalid
        params, an empty prompt, token ids outside the vocabulary, a prompt longer than the context, stop strings
        or bad words without a tokenizer, a request id in use.

        Args:
            listener: called with a `RequestUpdate` after each step that gave the request tokens, and once when it
                ends (on the thread that ran the step).
            return_scores: keep each step's processed scores and raw logits per completion (HF's output_scores).
            eos_token_ids: the ids that end it unless `params.ignore_eos` (default: the model's).
            stop_on_special_tokens_text: match `params.stop` against the text with special tokens spelled out, as
                Hugging Face's generate does, instead of the text returned (decoded with skip_special_tokens).
        """
        with self._lock:
            self._check_open()
            return self._add(list(prompt_token_ids), params, request_id, prompt, tokenizer, listener, return_scores,
                             arrival_time, self.eos_token_ids if eos_token_ids is None else frozenset(eos_token_ids),
                             stop_on_special_tokens_text)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this engine was closed (fastllm.release() or LLM.close()); optimize the model or "
                               "build an LLM again")

    def _add(self, prompt_ids, params, request_id, prompt, tokenizer, listener, return_scores, arrival_time,
             eos_token_ids, stop_on_special_tokens_text) -> CoreRequest:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        if request_id is None:
            request_id = self._unused_request_id()
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        elif request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._check_prompt(prompt_ids)
        needs_text = [name for name in ("stop", "bad_words") if getattr(params, name)]
        if needs_text and tokenizer is None:
            raise ValueError(f"{' and '.join(needs_text)} need a tokenizer")
        stop = (StopStrings(params.stop, tokenizer, skip_special_tokens=not stop_on_special_tokens_text)
                if params.stop else None)
        bad_words = bad_words_token_ids(params.bad_words or [], tokenizer)
        stop_ids = (frozenset() if params.ignore_eos else eos_token_ids) | frozenset(params.stop_token_ids or ())
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        output = RequestOutput(request_id, prompt, prompt_ids, [], False, RequestMetrics(arrival_time=arrival))
        req = CoreRequest(request_id, params, output, tokenizer, listener, return_scores)
        # max_tokens=None: the scheduler ends the completion with "length" when the context is full.
        max_new = params.max_tokens if params.max_tokens is not None else self.max_model_len
        for index in range(params.n):
            sched_req = Request(f"{request_id}:{index}", prompt_ids, max_new_tokens=max_new,
                                min_new_tokens=params.min_tokens, eos_token_ids=stop_ids)
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.runner.device).manual_seed(params.completion_seed(index))
            req.completions.append(_Completion(
                sched_req, req, index, generator, bad_words, stop_ids, stop,
                IncrementalDetokenizer(tokenizer) if tokenizer is not None and listener is not None else None,
                [] if params.logprobs is not None else None,
                [] if return_scores else None, [] if return_scores else None))
            output.outputs.append(CompletionOutput(index, "", [], None))
        for c in req.completions:  # validated above: the scheduler accepts them all
            self.scheduler.add(c.request)
            self._completions[c.request.request_id] = c
        self._requests[request_id] = req
        return req

    def _unused_request_id(self) -> str:
        """The next counter id that no unfinished request holds: a caller may have picked "7" for its own."""
        while True:
            request_id = str(next(self._ids))
            if request_id not in self._requests:
                return request_id

    def new_request_id(self) -> str:
        """A request id no other request of this core has (for requests refused before they reach it)."""
        with self._lock:
            return str(next(self._ids))

    def _check_prompt(self, prompt_ids: list) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt: a request needs at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
            raise ValueError("a prompt must be a list of integer token ids")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if len(prompt_ids) > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens is longer than max_model_len={self.max_model_len} "
                             "(the model's context, capped at what the KV cache holds)")

    def abort(self, request_id: str, error: str | None = None) -> bool:
        """End a request now (finish reason "abort"; `error` recorded if given) and free its blocks. Its listener
        gets a final update. Returns False if no unfinished request has this id."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None:
                return False
            if error is not None:
                req.output.error = error
            now = time.perf_counter()
            for c in req.completions:
                if c.request.request_id in self._completions:
                    self.scheduler.abort(c.request.request_id)
                    self._complete(c, now)
            self._emit([req])
            if not self.has_work():
                self._heap.release()
            return True

    def has_work(self) -> bool:
        """Whether a step remains: requests to schedule, or a step in flight whose tokens are unread."""
        return self.scheduler.has_unfinished() or self._overlap.inflight is not None

    def run_until(self, done: Callable[[], bool]) -> None:
        """Step (taking turns with other callers) until `done()`: the caller's own requests have finished."""
        while True:
            with self._lock:
                if done():
                    return
                if not self.has_work():
                    raise RuntimeError("the engine has no work left but the caller's requests are not finished")
                self._step()

    def step(self) -> bool:
        """Run one step if there is work; returns whether one ran."""
        with self._lock:
            if not self.has_work():
                return False
            self._step()
            return True

    # ---- one step --------------------------------------------------------------------------------------------

    def _step(self) -> None:
        self._heap.hold()  # the first step after idle (runtime/heap.py says why)
        touched: list[CoreRequest] = []
        try:
            if self.async_scheduling:
                self._step_async(touched)
            else:
                self._step_sync(touched)
        except NoRoomForRequest as error:  # nothing ran: end the request that cannot fit, the others go on
            self._fail_unschedulable(error)
        except Exception as error:
            self._fail_running(error)
        except BaseException as error:  # Ctrl-C: every request ends, every block goes back, then it propagates
            self._fail_running(error, everything=True)
            raise
        finally:
            if not self.has_work():
                self._heap.release()
        self._emit(touched)

    def _step_sync(self, touched: list) -> None:
        start = time.perf_counter()
        output = self.scheduler.schedule()
        scheduled = time.perf_counter()
        logits = self.runner.execute(output.chunks)  # launches; replayed steps do not wait for the GPU
        launched = time.perf_counter()
        sampled = [self._completions[c.request.request_id] for c in output.chunks if c.samples]
        token_ids, logprobs = self._sample(logits, sampled, host=True)
        sampled_at = time.perf_counter()
        self.scheduler.update(output, {c.request.request_id: t for c, t in zip(sampled, token_ids)})
        self._after_tokens(sampled, logprobs, time.perf_counter(), touched)
        self._account(start, scheduled, launched, sampled_at)

    def _step_async(self, touched: list) -> None:
        """Schedule and launch this step, read the in-flight step's tokens, then sample this step without waiting
        for it (runtime/overlap.py)."""
        start = time.perf_counter()
        output = self.scheduler.schedule() if self.scheduler.has_unfinished() else SchedulerOutput([], [])
        scheduled = time.perf_counter()
        logits = self._overlap.launch(output)
        launched = time.perf_counter()
        collected, token_ids = self._overlap.collect()
        self._after_tokens(collected, [None] * len(collected), time.perf_counter(), touched)
        resolved = time.perf_counter()
        if logits is not None:
            sampling = [self._completions.get(c.request.request_id) for c in output.chunks if c.samples]
            logits, sampled = self._overlap.live_rows(logits, sampling, lambda c: c is not None)
            plain = PLAIN_ROWS_FAST_PATH and bool(sampled) and all(c.plain_greedy for c in sampled)
            rows = [] if plain else [c.row() for c in sampled]
            if plain or (sampled and not any(needs_host_history(r) for r in rows)):
                tokens = argmax_rows(logits) if plain else self._sample(logits, sampled, host=False, rows=rows)
                self._overlap.start(output, sampled, tokens)
                self.num_overlapped_steps += 1
            else:  # rows that need the host: sample and apply now, as the synchronous loop does
                ids, logprobs = self._sample(logits, sampled, host=True, rows=rows)
                self.scheduler.update(output, {c.request.request_id: t for c, t in zip(sampled, ids)})
                self._after_tokens(sampled, logprobs, time.perf_counter(), touched)
        self._account(start, scheduled, launched, resolved)

    def _sample(self, logits: torch.Tensor, sampled: list[_Completion], *, host: bool, rows=None):
        """Tokens of `sampled`'s rows: on the device ([n]) or, with `host`, as (token ids, logprobs) lists. Rows that
        asked for scores keep their processed scores and raw logits."""
        rows = rows if rows is not None else [c.row() for c in sampled]
        if not sampled:
            return ([], []) if host else logits.new_empty(0, dtype=torch.long)
        keep = [i for i, c in enumerate(sampled) if c.scores is not None]
        if keep:
            tokens, scores = sample_tokens(logits, rows, return_scores=True)
            for i in keep:
                sampled[i].scores.append(scores[i])
                sampled[i].raw_logits.append(logits[i])
        else:
            tokens = sample_tokens(logits, rows)
        if not host:
            return tokens
        token_ids = tokens.tolist()
        return token_ids, token_logprobs(logits, rows, token_ids)

    def _account(self, start: float, scheduled: float, launched: float, sampled: float) -> None:
        marks = (start, scheduled, launched, sampled, time.perf_counter())
        for phase, begin, end in zip(("schedule", "execute", "sample", "update"), marks, marks[1:]):
            self.step_seconds[phase] += end - begin
        self.num_steps += 1

    def _after_tokens(self, sampled: list[_Completion], logprobs: list, now: float, touched: list) -> None:
        """Bookkeeping once `sampled` got their new tokens: counts, TTFT, logprobs, stop strings, completion.
        Completions ended before (aborted, or ended by the step before) are skipped."""
        failed = []
        for c, entry in zip(sampled, logprobs):
            # By identity: the id of a completion aborted while its step was in flight may already name a new
            # request's completion (a caller reusing its request id), which this token must not touch.
            if self._completions.get(c.request.request_id) is not c:
                continue
            if c.request.output_token_ids and c.request.output_token_ids[-1] == NO_TOKEN:
                c.request.output_token_ids.pop()  # no token was sampled: the request fails alone (below)
                failed.append(c.owner)
                continue
            self.num_generated_tokens += 1
            if c.first_token_time is None:
                c.first_token_time = now
            if c.logprobs is not None and entry is not None:
                c.logprobs.append(entry)
            tokens = c.request.output_token_ids
            # A token that ended the request by length (max_tokens or the context) may also complete a stop string:
            # as in vLLM, that is a "stop" and the text is cut (checking unfinished requests only kept the stop
            # string in the text, with "length", when the last allowed token spelled it).
            ending = not c.request.is_finished or c.request.finish_reason == "length"
            if (ending and c.stop is not None and len(tokens) >= c.owner.params.min_tokens
                    and c.stop.hit(tokens)):
                if c.request.is_finished:
                    c.request.finish_reason = "stop"  # its blocks are already free; only the reason changes
                else:
                    self.scheduler.finish(c.request, "stop")
                c.stopped_by_string = True
            if c.request.is_finished:
                self._complete(c, now)
            touched.append(c.owner)
        for req in dict.fromkeys(failed):
            for c in req.completions:
                if c.request.is_finished:  # (by length on the failed token: its blocks are free already)
                    c.request.finish_reason = "abort"
            self.abort(req.request_id, error=NO_TOKEN_ERROR)
            touched.append(req)

    def _complete(self, c: _Completion, now: float) -> None:
        """Fill the completion's output from its finished request; the request's too once all are done."""
        del self._completions[c.request.request_id]
        req, tokens = c.owner, list(c.request.output_token_ids)
        text = ""
        if req.tokenizer is not None:
            text = req.tokenizer.decode(tokens, skip_special_tokens=True)
            if c.stopped_by_string:
                text = c.stop.cut(text, tokens)
        req.output.outputs[c.index] = CompletionOutput(c.index, text, tokens, c.request.finish_reason, c.logprobs)
        m = req.output.metrics
        if c.first_token_time is not None:
            m.first_token_time = min(m.first_token_time or c.first_token_time, c.first_token_time)
        m.finish_time = max(m.finish_time or now, now)
        m.num_generated_tokens += len(tokens)
        if all(comp.request.request_id not in self._completions for comp in req.completions):
            req.output.finished = True
            del self._requests[req.request_id]
            self._record_metrics(req)

    def _record_metrics(self, req: CoreRequest) -> None:
        out = req.output
        if out.error is not None or any(c.finish_reason == "abort" for c in out.outputs):
            self.num_aborted_requests += 1
            return
        self.num_finished_requests += 1
        # Per completion for TPOT: n completions decode in parallel, so the request's total would overcount.
        per_completion = round(out.metrics.num_generated_tokens / max(len(out.outputs), 1))
        m = RequestMetrics(out.metrics.arrival_time, out.metrics.first_token_time, out.metrics.finish_time,
                           per_completion)
        if m.time_to_first_token is not None:
            self._ttft.append(m.time_to_first_token)
        if m.time_per_output_token is not None:
            self._tpot.append(m.time_per_output_token)

    def _emit(self, touched: list[CoreRequest]) -> None:
        """Hand each touched request's news to its listener. A listener that raises ends its own request."""
        for req in dict.fromkeys(touched):
            if req.listener is None or req.final_update_sent:
                continue
            new_ids, new_text = {}, {}
            for c in req.completions:
                tokens = c.request.output_token_ids
                if len(tokens) > c.num_sent:
                    new_ids[c.index] = list(tokens[c.num_sent:])
                    c.num_sent = len(tokens)
                    if c.detokenizer is not None:
                        new_text[c.index] = c.detokenizer.step(tokens)
            if not new_ids and not req.finished:
                continue
            req.final_update_sent = req.finished
            try:
                req.listener(RequestUpdate(req.request_id, new_ids, new_text, req.finished, req.output))
            except Exception as error:
                req.listener = None
                req.listener_error = error
                if not req.finished:
                    self.abort(req.request_id, error=f"{type(error).__name__}: {error}")

    def _fail_unschedulable(self, error: NoRoomForRequest) -> None:
        """The oldest request cannot fit in the KV cache even alone: end it (and its sibling completions) with the
        error, so the requests behind it can run. The step in flight, if any, is kept: its tokens are valid."""
        stuck = self._completions.get(error.request.request_id) if error.request is not None else None
        if stuck is None or stuck.request is not error.request:  # not a request of this core: nothing else to end
            self._fail_running(error, everything=True)
            return
        # Like a request refused at add(): it ends alone with its error; no step failed, so `fault` stays None.
        self.abort(stuck.owner.request_id, error=f"this request cannot run: {error}")

    def _fail_running(self, error: BaseException, everything: bool = False) -> None:
        """A step failed: end the requests it may have touched (every running one, and with `everything` the waiting
        ones too) with the error, give their blocks back, and forget the step in flight."""
        self._overlap.drop()
        running = {r.request_id for r in self.scheduler.running}
        message = f"the engine step failed: {type(error).__name__}: {error}"
        for req in list(self._requests.values()):
            if everything or any(c.request.request_id in running for c in req.completions):
                req.fault = error
                self.abort(req.request_id, error=message)

    # ---- scoring: model(...) on the compiled step ------------------------------------------------------------

    def score(self, sequences: Sequence[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        """The logits of every token of each (token ids, positions) sequence, [len, V] in the runner's logits dtype,
        over KV blocks taken for it and given back after. Up to max_num_batched_tokens tokens in all: one eager step;
        more: each sequence prefilled in steps of that many tokens, as the scheduler splits a long prompt (each step
        attends to the earlier ones through the cache), so a long call needs no more activation memory than the
        runner was sized for."""
        with self._lock:
            for tokens, positions in sequences:
                self._check_prompt(tokens)
                # A position past the context would read past the model's tables (learned position embeddings, the
                # rotary cos/sin of rope_table): an IndexError on the CPU, a device-side assert on CUDA.
                bad = [p for p in positions if not 0 <= p < self.max_model_len]
                if bad:
                    raise ValueError(f"position_ids must lie in [0, {self.max_model_len}) (max_model_len); got "
                                     f"{bad[:5]}")
            tables = []
            try:
                for tokens, _ in sequences:
                    tables.append(BlockTable(self.runner.pool))
                    try:
                        tables[-1].ensure_capacity(len(tokens))
                    except OutOfBlocks as error:
                        raise RuntimeError(f"the KV cache has too few free blocks for this forward of "
                                           f"{sum(len(t) for t, _ in sequences)} tokens ({error})") from None
                chunk = self.scheduler.max_num_batched_tokens
                if sum(len(tokens) for tokens, _ in sequences) <= chunk:
                    logits = self.runner.execute_input(self._score_step(sequences, tables, 0, None))
                    out, offset = [], 0
                    for tokens, _ in sequences:
                        out.append(logits[offset:offset + len(tokens)])
                        offset += len(tokens)
                    return out
                return [torch.cat([self.runner.execute_input(self._score_step([seq], [table], start, start + chunk))
                                   for start in range(0, len(seq[0]), chunk)])
                        for seq, table in zip(sequences, tables)]
            finally:
                for table in tables:
                    table.free()

    @staticmethod
    def _score_step(sequences, tables, start: int, end: int | None) -> StepInput:
        """One step over tokens [start, end) of each sequence (end None: to its end), every row sampled; the
        tokens before `start` are in the sequence's blocks already."""
        step = StepInput([], [], [], [], [], [], [])
        for (tokens, positions), table in zip(sequences, tables):
            stop = len(tokens) if end is None else min(end, len(tokens))
            begin = len(step.token_ids)
            step.token_ids += tokens[start:stop]
            step.positions += positions[start:stop]
            step.slots += table.slots(start, stop)
            step.seq_lens.append(stop)
            step.query_lens.append(stop - start)
            step.block_tables.append(table.blocks)
            step.sample_rows += range(begin, begin + stop - start)
        return step

    # ---- metrics and lifetime --------------------------------------------------------------------------------

    def metrics(self) -> dict:
        """Engine counters: the scheduler's `stats()` (running / waiting requests, KV blocks used / free,
        preemptions, prefix-cache hits), plus generated tokens, finished / aborted requests, TTFT / TPOT samples
        (seconds, one per finished request; the latest MAX_METRIC_SAMPLES) and histograms over them (counts per
        bucket with upper bounds `HISTOGRAM_BOUNDS`, plus one open bucket), output tokens per second of the time
        spent stepping (`tokens_per_s`), and the step loop's profile: steps run and host seconds per phase
        (`step_seconds`: schedule, execute = prepare and launch, sample = wait for the GPU and pick tokens,
        update = bookkeeping)."""
        with self._lock:
            self._check_open()  # its runner's cache is gone: kv_cache_info() raised IndexError
            busy = sum(self.step_seconds.values())
            return {
                **self.scheduler.stats(),
                "kv_blocks_total": self.runner.pool.num_blocks,
                "kv_cache": self.runner.kv_cache_info(),
                "num_generated_tokens": self.num_generated_tokens,
                "num_finished_requests": self.num_finished_requests,
                "num_aborted_requests": self.num_aborted_requests,
                "time_to_first_token_s": list(self._ttft),
                "time_per_output_token_s": list(self._tpot),
                "histogram_bounds_s": list(HISTOGRAM_BOUNDS),
                "time_to_first_token_histogram": _histogram(self._ttft),
                "time_per_output_token_histogram": _histogram(self._tpot),
                "tokens_per_s": self.num_generated_tokens / busy if busy else 0.0,
                "num_steps": self.num_steps,
                "num_overlapped_steps": self.num_overlapped_steps,
                "step_seconds": dict(self.step_seconds),
            }

    def reserve(self, memory_fraction: float | None = None) -> dict:
        """Grow the KV cache to its cap now, as a server reserves its memory (`memory_fraction`: a new cap, see
        `ModelRunner.reserve`); returns `runner.kv_cache_info()`."""
        with self._lock:
            self.runner.reserve(memory_fraction)
            return self.runner.kv_cache_info()

    def capture_graphs(self) -> None:
        """Record every CUDA graph the runner may replay now (as a server does before serving), not on first use."""
        with self._lock:
            self.runner.capture_all()

    def close(self) -> None:
        """End every request (finish reason "abort") and let go of the KV cache, buffers and CUDA graphs. The core
        is unusable afterwards."""
        with self._lock:
            for request_id in list(self._requests):
                self.abort(request_id, error="the engine was closed")
            self._overlap.drop()
            self.runner.close()
            self._heap.release()
            self.closed = True

    def count_aborted(self) -> None:
        """Count a request an entry point refused before it reached the core (metrics' num_aborted_requests)."""
        with self._lock:
            self.num_aborted_requests += 1


def bad_words_token_ids(words: list[str], tokenizer) -> list[list[int]]:
    # Like vLLM: the word as given and with a leading space, since BPE vocabularies spell a word that follows a
    # space as a different token.
    sequences = []
    for word in words:
        for variant in (word, " " + word.lstrip()):
            ids = list(tokenizer(variant, add_special_tokens=False).input_ids)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


def _histogram(values) -> list[int]:
    counts = [0] * (len(HISTOGRAM_BOUNDS) + 1)
    for v in values:
        counts[next((i for i, b in enumerate(HISTOGRAM_BOUNDS) if v <= b), len(HISTOGRAM_BOUNDS))] += 1
    return counts
