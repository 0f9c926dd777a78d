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

A stream's `new_text` concatenates to each completion's final `text` (`StreamText`): text that may begin a stop string
is held back until it is resolved, a stop string is never sent, and the final update carries what remains (a last
character the tokens left incomplete, which the final text spells U+FFFD, as `LLM` returns it).
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


@dataclass
class _Held:
    """One completion's text in a stream: what was sent, what is held back, and its tokens so far."""

    sent: str = ""
    pending: str = ""
    num_tokens: int = 0
    stopped: bool = False  # a stop string is in the text: nothing more is sent until the request ends


class StreamText:
    """Turns a request's raw per-step text (the core's detokenizer: whole characters, stop strings included) into
    stream deltas that concatenate to each completion's final `text` (vLLM's streams do the same).

    Mid-stream, the end of the text that may be the beginning of a stop string is held back until later text settles
    it, and from a stop string on nothing is sent: with n > 1 a completion that stopped ends in an update that is not
    the request's last, and its cut text comes only with the request's end. The final update sends the final text past
    what was sent: the cut before the stop string, or a last multi-byte character the tokens left incomplete (the
    detokenizer holds it back; the final text spells it U+FFFD).

    Args:
        params: the request's SamplingParams (its `stop` strings and `min_tokens`).
    """

    def __init__(self, params: SamplingParams) -> None:
        self.stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or ())
        self.min_tokens = params.min_tokens
        self._held: dict[int, _Held] = {}

    def step(self, update) -> dict[int, str]:
        """The text to send for `update` (a `StreamOutput` or `RequestUpdate`; its `output` is needed when it is
        finished), by completion index."""
        for index, tokens in update.new_token_ids.items():
            self._held.setdefault(index, _Held()).num_tokens += len(tokens)
        if not update.finished or update.output is None:
            return {index: self._release(self._held.setdefault(index, _Held()), piece)
                    for index, piece in update.new_text.items()}
        text = {}
        for completion in update.output.outputs:
            state = self._held.setdefault(completion.index, _Held())
            # The incremental text is a prefix of the final one (both decode the same tokens) unless a tokenizer
            # decodes a window differently from the whole; then nothing more is sent rather than a wrong tail.
            rest = completion.text[len(state.sent):] if completion.text.startswith(state.sent) else ""
            state.sent, state.pending = completion.text, ""
            if rest or completion.index in update.new_text:
                text[completion.index] = rest
        return text

    def _release(self, state: _Held, piece: str) -> str:
        text = state.pending + piece
        if state.stopped or not self.stops:
            cut = 0 if state.stopped else len(text)
        else:
            cut = len(text) - self._stop_prefix_length(text)
            # Before min_tokens the core lets stop strings pass. After it, an occurrence ends the completion, and with
            # n > 1 the request runs on: nothing from it on goes out before the request's end, whose final text is
            # cut (an occurrence that min_tokens let pass in a merged update is so sent late, never wrongly).
            if state.num_tokens >= self.min_tokens:
                found = [i for s in self.stops if (i := text.find(s)) != -1]
                if found:
                    state.stopped, cut = True, min(cut, *found)  # nor a longer stop string's beginning before it
        state.pending, text = text[cut:], text[:cut]
        state.sent += text
        return text

    def _stop_prefix_length(self, text: str) -> int:
        """The length of the longest end of `text` that is a proper beginning of a stop string (0 if none): what
        must wait for the next text. Only the places where a stop string holds `text`'s last character are tried,
        so a long stop string costs a few `endswith`, not one per character."""
        longest, last = 0, text[-1:] if text else ""
        for stop in self.stops:
            j = stop.find(last, 0, len(stop) - 1) if last else -1
            while j != -1:
                if j + 1 > longest and text.endswith(stop[:j + 1]):
                    longest = j + 1
                j = stop.find(last, j + 1, len(stop) - 1)
        return longest


class AsyncLLM:
    """Streams requests through an `LLM`'s engine core, stepped on a background thread."""

    holds_back_text = True  # its streams' `new_text` is already `StreamText`'s: the server must not hold it back twice

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
        text = StreamText(request.params)  # the core's validated params (a dict given here became SamplingParams)
        try:
            while not finished:
                update = merged_updates(await queue.get(), queue)
                finished = update.finished
                if finished and request.fault is not None:
                    raise RuntimeError(request.output.error) from request.fault
                yield StreamOutput(update.request_id, update.new_token_ids, finished, update.output, text.step(update))
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
