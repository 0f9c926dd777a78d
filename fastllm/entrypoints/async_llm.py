"""`AsyncLLM`: many concurrent requests, each streamed token by token, over a model's engine core.

    engine = AsyncLLM(LLM(model, tokenizer=tokenizer))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32)):
        print(out.new_token_ids, out.new_text, out.finished)

A background thread steps the engine core while it has work (a step blocks on the GPU); the core's lock lets other
callers (`LLM.generate`, `model.generate`) add and step alongside it. New requests are handed to that thread, which
adds every waiting one between two steps: adding from the event loop would take the core's lock, blocking the
loop (and every stream it writes) for up to a step per request. Each request's listener hands its step updates to
the event loop with `call_soon_threadsafe`. A stream whose consumer stops reading (cancelled, closed,
or garbage-collected: a client that went away) aborts its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastllm.entrypoints.llm import LLM
from fastllm.runtime.outputs import RequestOutput, RequestUpdate
from fastllm.runtime.sampling_params import SamplingParams


@dataclass
class StreamOutput:
    """One update of a streamed request: what each completion produced since the last update."""

    request_id: str
    new_token_ids: dict[int, list[int]]   # completion index -> new tokens
    finished: bool
    output: RequestOutput                 # the whole request so far (final when `finished`)
    new_text: dict[int, str] = field(default_factory=dict)  # completion index -> new text (with a tokenizer)


class AsyncLLM:
    """Streams requests through an `LLM`'s engine core, stepped on a background thread."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.core = llm.core
        self._wake = threading.Event()
        self._aborts: collections.deque[str] = collections.deque()  # from streams that stopped being read
        self._adds: collections.deque[_PendingAdd] = collections.deque()  # for the step thread to add
        # This engine's unfinished requests, from when the step thread added them (before their streams hear back:
        # shutdown() must abort those too, or they would hold their KV blocks with no thread left to step them).
        self._requests: set[str] = set()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="fastllm-step-loop", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def max_num_seqs(self) -> int:
        """Completions the engine runs at once."""
        return self.llm.scheduler.max_num_seqs

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def metrics(self) -> dict:
        """The engine core's counters (see `EngineCore.metrics`)."""
        return self.llm.metrics()

    @property
    def running(self) -> bool:
        """Whether the step loop runs (not shut down, its thread alive): requests can be added."""
        return not self._stopped and self._thread.is_alive()

    def _check_running(self) -> None:
        if not self.running:
            raise RuntimeError("the engine's step loop is not running (AsyncLLM was shut down)")

    async def generate(self, prompt, sampling_params: SamplingParams | None = None, *,
                       request_id: str | None = None) -> AsyncIterator[StreamOutput]:
        """Add a request and yield its updates until it finishes (or is aborted). A bad request yields one finished
        update whose `output.error` says why. Stopping to read the stream aborts the request.

        Raises:
            RuntimeError: the engine was shut down, or a model step failed (the request has ended).
        """
        self._check_running()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestUpdate] = asyncio.Queue()
        listener = lambda update: loop.call_soon_threadsafe(queue.put_nowait, update)  # noqa: E731
        added = loop.create_future()
        self._adds.append(_PendingAdd(prompt, sampling_params or SamplingParams(), listener, request_id, loop, added))
        self._wake.set()
        request = await added  # the core's request, or the refusal (a finished RequestOutput)
        if isinstance(request, RequestOutput):  # refused
            yield StreamOutput(request.request_id, {}, True, request)
            return
        self._wake.set()
        finished = False
        try:
            while not finished:
                update = merged_updates(await queue.get(), queue)
                finished = update.finished
                if finished and request.fault is not None:
                    raise RuntimeError(request.output.error) from request.fault
                yield StreamOutput(update.request_id, update.new_token_ids, finished, update.output, update.new_text)
        finally:
            self._requests.discard(request.request_id)
            if not finished:  # the consumer went away: the step thread aborts it (never block the event loop)
                self._aborts.append(request.request_id)
                self._wake.set()

    def abort(self, request_id: str) -> bool:
        """Stop a request now: its blocks are freed and its stream ends with finish_reason "abort". Returns False if
        no unfinished request has this id."""
        self._check_running()
        return self.core.abort(request_id)

    def _forget(self, request_id: str) -> None:
        """A request whose stream went away before it started reading: the step thread aborts it."""
        self._requests.discard(request_id)
        self._aborts.append(request_id)
        self._wake.set()

    def shutdown(self) -> None:
        """Stop the step thread; this engine's unfinished requests end with "abort"."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        while self._adds:  # never added: their streams raise instead of waiting forever
            self._adds.popleft().resolve(RuntimeError("the engine's step loop was shut down"), self)
        for request_id in list(self._requests):
            self.core.abort(request_id)

    def _loop(self) -> None:
        while not self._stopped:
            while self._aborts:
                self.core.abort(self._aborts.popleft())
            while self._adds:
                pending = self._adds.popleft()
                try:
                    result = self.llm.add_request(pending.prompt, pending.params, listener=pending.listener,
                                                  request_id=pending.request_id)
                except Exception as error:  # e.g. the engine was closed: that stream raises, the loop goes on
                    result = error
                if not isinstance(result, (BaseException, RequestOutput)):
                    self._requests.add(result.request_id)
                pending.resolve(result, self)
            if not self.core.step():
                self._wake.wait(timeout=0.05)
                self._wake.clear()


@dataclass
class _PendingAdd:
    """A request handed to the step thread, and the future its stream awaits."""

    prompt: object
    params: SamplingParams
    listener: object
    request_id: str | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def resolve(self, result, engine: AsyncLLM) -> None:
        """Give the stream `result` (the core's request, a refusal, or an exception), on its event loop's thread."""
        def deliver():
            if not self.future.cancelled():
                if isinstance(result, BaseException):
                    self.future.set_exception(result)
                else:
                    self.future.set_result(result)
            elif not isinstance(result, (BaseException, RequestOutput)):  # its stream went away while it was added
                engine._forget(result.request_id)

        try:
            self.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the stream's event loop is closed: nobody is waiting; the request must not run
            if not isinstance(result, (BaseException, RequestOutput)):
                engine._forget(result.request_id)


def merged_updates(update, queue: asyncio.Queue):
    """`update` and the updates queued behind it as one: a consumer that fell behind the step thread (a server
    writing a thousand streams) catches up in one yield per request instead of one per step, so its work per step
    shrinks as it lags rather than growing the backlog. Updates are dataclasses with `new_token_ids`, `new_text` and
    `finished` (the later one's other fields win); an exception queued behind them (the engine went away) is
    returned in their place."""
    while not isinstance(update, BaseException) and not update.finished and not queue.empty():
        later = queue.get_nowait()
        if isinstance(later, BaseException):
            return later
        tokens = {i: update.new_token_ids.get(i, []) + later.new_token_ids.get(i, [])
                  for i in update.new_token_ids.keys() | later.new_token_ids.keys()}
        text = {i: update.new_text.get(i, "") + later.new_text.get(i, "")
                for i in update.new_text.keys() | later.new_text.keys()}
        update = dataclasses.replace(later, new_token_ids=tokens, new_text=text)
    return update
