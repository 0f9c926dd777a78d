"""`EngineClient`: an `AsyncLLM` whose engine core runs in its own process.

    client = EngineClient(functools.partial(build_llm, "path/to/model"))   # build_llm() -> LLM, run in the child
    async for out in client.generate([1, 2, 3], SamplingParams(max_tokens=32)):
        print(out.new_token_ids, out.new_text, out.finished)

Why a process: a server writes every token of every stream (a thousand streams at a step every 60 ms is ~16,000
events a second), and the engine's step spends milliseconds of Python per step scheduling, sampling and updating a
thousand requests. In one process both need the GIL, so each slows the other (measured on an H200: HTTP throughput
0.22 of offline `LLM`). Here the child owns the model and steps its core as fast as offline `LLM` does; the parent
only sends requests and reads one message of updates per step.

Wire: two one-way pipes. Parent -> child: ("add", id, prompt, params), ("abort", id), ("shutdown",). Child -> parent:
("ready", EngineInfo) once, then ("updates", [packed _Wire...], metrics or None) per step that produced any, or
("failed", message) if the model could not be built. Updates carry only what is new (tokens, text); the whole
`RequestOutput` travels once, when the request ends. A sender thread writes to the child (a large prompt must not
block the event loop while the child is mid-step); a reader thread hands each step's updates to the event loop in one
`call_soon_threadsafe`. If the child dies, every open stream raises and `running` turns False.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import pickle
import queue
import signal
import threading
import time
import traceback
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastllm.entrypoints.async_llm import StreamOutput, StreamText, merged_updates
from fastllm.runtime.outputs import RequestOutput, RequestUpdate
from fastllm.runtime.sampling_params import SamplingParams

# The child sends the core's counters with a step's updates at most this often (and whenever it goes idle, so a
# scrape after the last request ended sees its blocks freed).
METRICS_INTERVAL_S = 0.25


@dataclass
class EngineInfo:
    """What the parent learns of the engine once it is built."""

    tokenizer: object
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    metrics: dict


@dataclass
class _Wire:
    """One request's update as the parent's streams read it: new tokens and text; the output only at the end.

    Between the processes it travels as a plain tuple, (request_id, new_token_ids, new_text) while the request runs
    and (request_id, new_token_ids, new_text, output, fault) when it ends: a thousand dataclasses a step cost ~1 ms to
    pickle in the child (the step's critical path) and ~10 ms to unpickle in the parent; tuples ~0.2 ms."""

    request_id: str
    new_token_ids: dict[int, list[int]]
    new_text: dict[int, str]
    output: RequestOutput | None = None   # when finished
    fault: str | None = None              # a model step failed under the request (the output's error)
    finished: bool = False

    @classmethod
    def unpacked(cls, packed: tuple) -> _Wire:
        return cls(*packed, finished=len(packed) > 3)


class EngineClient:
    """Streams requests through an engine core in a child process (`build_llm()` runs there and returns its `LLM`).

    Args:
        build_llm: a picklable callable (a module-level function or a `functools.partial` of one) that builds the
            model and returns its `fastllm.LLM`. The child is started with "spawn", so it imports what it needs.
        startup_timeout_s: how long building may take before the child is stopped and this raises.

    Raises:
        whatever building the engine raised in the child (re-raised here), or RuntimeError if the child died or
        took longer than `startup_timeout_s`.
    """

    holds_back_text = True  # its streams' `new_text` is StreamText's (SamplingParams given): the server's is not needed

    def __init__(self, build_llm: Callable, *, startup_timeout_s: float = 3600.0) -> None:
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked; a fresh interpreter holds no locks
        to_child_read, self._to_child = context.Pipe(duplex=False)
        self._from_child, from_child_write = context.Pipe(duplex=False)
        self._process = context.Process(target=_engine_main, args=(build_llm, to_child_read, from_child_write),
                                        name="fastllm-engine", daemon=True)
        self._process.start()
        to_child_read.close()
        from_child_write.close()
        self.info = self._wait_ready(startup_timeout_s)
        self.tokenizer = self.info.tokenizer
        self.max_num_seqs = self.info.max_num_seqs
        self.max_model_len = self.info.max_model_len
        self._metrics = self.info.metrics
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._ids = itertools.count()
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._dead: str | None = None   # why the child is gone, once it is
        self._stopped = False
        # The threads hold no reference to this client (the reader a weak one): a client dropped without shutdown()
        # is collected, and its finalizer stops the engine process and the model it holds.
        self._reader = threading.Thread(target=_read_loop, args=(weakref.ref(self), self._from_child),
                                        name="fastllm-engine-reader", daemon=True)
        self._sender = threading.Thread(target=_send_loop, args=(self._outgoing, self._to_child),
                                        name="fastllm-engine-sender", daemon=True)
        self._reader.start()
        self._sender.start()
        self._finalizer = weakref.finalize(self, _stop_process, self._process, self._outgoing, 10.0)

    def _wait_ready(self, timeout_s: float) -> EngineInfo:
        deadline = time.monotonic() + timeout_s
        while not self._from_child.poll(0.2):
            if not self._process.is_alive():
                raise RuntimeError(f"the engine process exited while building the model (exit code "
                                   f"{self._process.exitcode}); its output above says why")
            if time.monotonic() > deadline:
                self._process.kill()
                raise RuntimeError(f"the engine process did not finish building the model in {timeout_s:.0f} s")
        kind, payload = self._from_child.recv()
        if kind == "failed":  # the child's own exception: a bad path is the same error as in one process
            self._process.join(timeout=10)
            raise payload
        return payload

    @property
    def running(self) -> bool:
        """Whether requests can be added: not shut down and the engine process alive."""
        return not self._stopped and self._dead is None and self._process.is_alive()

    def metrics(self) -> dict:
        """The engine core's counters (`EngineCore.metrics` without its per-request sample lists) as last reported
        by the child: at most `METRICS_INTERVAL_S` old while it steps, current once it is idle."""
        return self._metrics

    async def generate(self, prompt, sampling_params: SamplingParams | None = None, *,
                       request_id: str | None = None) -> AsyncIterator[StreamOutput]:
        """As `AsyncLLM.generate`: yields the request's updates until it ends; a refused request yields one finished
        update whose `output.error` says why; stopping to read aborts it. `output` is None until the last update
        (only what is new crosses the process boundary).

        Raises:
            RuntimeError: the engine was shut down or its process died, or a model step failed (the request ended).
            ValueError: `request_id` is already streaming.
        """
        if not self.running:
            raise RuntimeError(self._dead or "the engine process is not running (EngineClient was shut down)")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        updates: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already streaming")
            self._streams[request_id] = (asyncio.get_running_loop(), updates)
        params = sampling_params or SamplingParams()
        self._outgoing.put(("add", request_id, prompt, params))
        # The child sends the core's text as it comes (stop strings and all); held back here, as AsyncLLM does, so
        # the deltas concatenate to the final text. (Params given as a dict are the child's to validate: raw text.)
        held = StreamText(params) if isinstance(params, SamplingParams) else None
        finished = False
        try:
            while not finished:
                update = merged_updates(await updates.get(), updates)
                if isinstance(update, BaseException):  # the child died
                    finished = True
                    raise RuntimeError(str(update)) from update
                finished = update.finished
                if finished and update.fault is not None:
                    raise RuntimeError(update.fault)
                text = update.new_text if held is None else held.step(update)
                yield StreamOutput(request_id, update.new_token_ids, finished, update.output, text)
        finally:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            if not finished and self._dead is None:  # the consumer went away: stop the request in the child
                self._outgoing.put(("abort", request_id))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine process (its requests end); open streams raise."""
        if self._stopped:
            return
        self._stopped = True
        self._finalizer.detach()
        _stop_process(self._process, self._outgoing, timeout_s)
        self._fail_streams("the engine process was shut down")

    def _received(self, updates: list[tuple], metrics: dict | None) -> None:
        if metrics is not None:
            self._metrics = metrics
        self._deliver(updates)

    def _child_gone(self) -> None:
        if not self._stopped:
            self._dead = f"the engine process died (exit code {self._process.exitcode})"
            self._fail_streams(self._dead)

    def _deliver(self, updates: list[tuple]) -> None:
        """One step's updates to their streams: one hop per event loop, however many requests moved."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._streams_lock:
            for packed in updates:
                stream = self._streams.get(packed[0])
                if stream is not None:  # else its stream ended (the abort is on its way)
                    by_loop.setdefault(stream[0], []).append((stream[1], _Wire.unpacked(packed)))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody reads those streams
                pass

    def _fail_streams(self, why: str) -> None:
        with self._streams_lock:
            streams = list(self._streams.values())
        for loop, updates in streams:
            try:
                loop.call_soon_threadsafe(updates.put_nowait, RuntimeError(why))
            except RuntimeError:
                pass


def _stop_process(process, outgoing: queue.SimpleQueue, timeout_s: float) -> None:
    """Ask the engine process to stop (it aborts its requests and frees the model), kill it if it does not; end the
    sender thread."""
    outgoing.put(("shutdown",))
    process.join(timeout=timeout_s)
    if process.is_alive():
        process.kill()
        process.join(timeout=5)
    outgoing.put(None)


def _send_loop(outgoing: queue.SimpleQueue, connection) -> None:
    while (message := outgoing.get()) is not None:
        try:
            connection.send(message)
        except (OSError, ValueError):  # the child is gone; the reader reports it
            return
        if message[0] == "shutdown":
            return


def _read_loop(client_ref, connection) -> None:
    """Hands each message of the child to its client while the client lives; tells it when the child is gone."""
    while True:
        try:
            _, updates, metrics = connection.recv()
        except (EOFError, OSError):
            break
        client = client_ref()
        if client is None:  # collected: its finalizer stops the child
            return
        client._received(updates, metrics)
        del client  # no reference held while blocked in recv()
    client = client_ref()
    if client is not None:
        client._child_gone()


def _put_all(items) -> None:
    for updates, update in items:
        updates.put_nowait(update)


def _engine_main(build_llm: Callable, inbox, outbox) -> None:
    """The child: build the engine, report it, then step it and relay requests and updates until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides when we stop
    try:
        llm = build_llm()
        info = EngineInfo(llm.tokenizer, llm.scheduler.max_num_seqs, llm.scheduler.max_num_batched_tokens,
                          llm.core.max_model_len, llm.metrics())
    except BaseException as error:  # noqa: BLE001 - the parent raises it
        if not isinstance(error, (OSError, ValueError)):  # a bad path or argument says all in its message
            traceback.print_exc()
        try:
            outbox.send(("failed", error))
        except Exception:  # not picklable: its text
            outbox.send(("failed", RuntimeError(f"{type(error).__name__}: {error}")))
        return
    outbox.send(("ready", info))
    _EngineLoop(llm, inbox, outbox).run()


class _EngineLoop:
    """Steps the core while it has work; between steps adds and aborts what the parent sent."""

    def __init__(self, llm, inbox, outbox) -> None:
        self.llm, self.core = llm, llm.core
        self.inbox, self.outbox = inbox, outbox
        # Messages are pickled here (a fraction of a millisecond) and written by a thread: a parent slow to read (its
        # reader waits for the GIL behind the event loop) must not stall the next step.
        self.writes: queue.SimpleQueue = queue.SimpleQueue()
        self.writer = threading.Thread(target=self._write_loop, name="fastllm-engine-writer", daemon=True)
        self.writer.start()
        self.requests: dict = {}          # request id -> the core's request, while unfinished
        self.updates: list[tuple] = []    # this step's, packed as `_Wire` describes, sent after it
        self.metrics_sent_at = 0.0
        self.changed = False              # something happened since the last metrics were sent

    def run(self) -> None:
        worked = False
        try:
            while self._receive(block=not worked):
                worked = self.core.step()
                self._send(idle=not worked)
        except (EOFError, OSError):  # the parent is gone: nobody to serve
            pass
        finally:
            for request_id in list(self.requests):
                self.core.abort(request_id)
            self.llm.close()
            self.writes.put(None)
            self.writer.join(timeout=10)

    def _write_loop(self) -> None:
        while (message := self.writes.get()) is not None:
            try:
                self.outbox.send_bytes(message)
            except OSError:  # the parent is gone
                return

    def _receive(self, block: bool) -> bool:
        """Handle every waiting message (waiting for one if `block`); False once told to shut down."""
        while self.inbox.poll(None if block else 0):
            block = False
            message = self.inbox.recv()
            if message[0] == "shutdown":
                return False
            self.changed = True
            if message[0] == "add":
                self._add(*message[1:])
            elif message[0] == "abort":
                self.core.abort(message[1])
        self._send(idle=False)  # refusals and aborts are answered before the next step
        return True

    def _add(self, request_id: str, prompt, params: SamplingParams) -> None:
        result = self.llm.add_request(prompt, params, request_id=request_id,
                                      listener=lambda update: self._on_update(update))
        if isinstance(result, RequestOutput):  # refused: its stream ends with the reason
            self.updates.append((request_id, {}, {}, result, None))
        else:
            self.requests[request_id] = result

    def _on_update(self, update: RequestUpdate) -> None:
        if not update.finished:
            self.updates.append((update.request_id, update.new_token_ids, update.new_text))
            return
        request = self.requests.pop(update.request_id, None)
        fault = update.output.error if request is not None and request.fault is not None else None
        self.updates.append((update.request_id, update.new_token_ids, update.new_text, update.output, fault))

    def _send(self, idle: bool) -> None:
        now = time.monotonic()
        self.changed = self.changed or bool(self.updates)
        due = self.changed and (idle or now - self.metrics_sent_at >= METRICS_INTERVAL_S)
        if not self.updates and not due:
            return
        metrics = None
        if due:  # the counters a server shows; not the per-request samples (thousands of floats)
            metrics = {k: v for k, v in self.llm.metrics().items() if not isinstance(v, list)}
            self.metrics_sent_at, self.changed = now, False
        self.writes.put(pickle.dumps(("updates", self.updates, metrics), protocol=pickle.HIGHEST_PROTOCOL))
        self.updates = []
