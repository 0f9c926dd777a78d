"""`AsyncLLM`: many concurrent requests, each streamed token by token, on one background step loop.

    engine = AsyncLLM(LLM(model, tokenizer=tokenizer))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32)):
        print(out.new_token_ids, out.finished)

The model steps run in one background thread (a step blocks on the GPU), which alone touches the engine:
adding and aborting requests are commands it runs between two steps (a lock shared with a thread that takes it
back after every step starves the other side), and each step's new tokens are handed back to the loop with
`call_soon_threadsafe`. Requests join and leave between steps: in-flight batching.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastllm.runtime.engine import LLM, RequestOutput
from fastllm.runtime.sampling_params import SamplingParams


@dataclass
class StreamOutput:
    """One update of a streamed request: the tokens produced since the last update, per completion."""

    request_id: str
    new_token_ids: dict[int, list[int]]   # completion index -> new tokens
    finished: bool
    output: RequestOutput                 # the whole request so far (final when `finished`)


class AsyncLLM:
    """Streams requests through an `LLM`'s scheduler and model runner on a background thread.

    It takes the `LLM` over: do not call `llm.generate()` while an AsyncLLM runs on it.
    """

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        # (future, command) pairs from any thread, run by the step thread between steps.
        self._commands: collections.deque[tuple[concurrent.futures.Future, Callable[[], object]]] = collections.deque()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, RequestOutput]] = {}
        self._sent: dict[str, int] = {}   # sequence id -> tokens already streamed
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="fastllm-step-loop", daemon=True)
        self._thread.start()

    async def generate(self, prompt, sampling_params: SamplingParams | None = None) -> AsyncIterator[StreamOutput]:
        """Add a request and yield its updates until it finishes (or is aborted). A bad request yields one
        finished update whose `output.error` says why."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        out = await asyncio.wrap_future(self._submit(lambda: self._add(prompt, sampling_params, loop, queue)))
        if out.error is not None:
            yield StreamOutput(out.request_id, {}, True, out)
            return
        while True:
            update = await queue.get()
            if isinstance(update, BaseException):
                raise RuntimeError("the engine's step loop failed") from update
            yield update
            if update.finished:
                return

    def abort(self, request_id: str) -> concurrent.futures.Future:
        """Stop a request before the engine's next step: its blocks are freed and its stream ends with
        finish_reason "abort". Returns a future done once that happened."""
        return self._submit(lambda: self._abort(request_id))

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- the step thread ---------------------------------------------------------------------------------

    def _submit(self, command: Callable[[], object]) -> concurrent.futures.Future:
        """Run `command` on the step thread between two steps; its result (or error) comes in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.append((future, command))
        self._wake.set()
        if not self._thread.is_alive():  # failed or shut down: nothing would run it
            self._reject_commands()
        return future

    def _run_commands(self) -> None:
        while self._commands:
            future, command = self._commands.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(command())
                except Exception as error:  # the caller's error (a bad argument), not the loop's
                    future.set_exception(error)

    def _reject_commands(self) -> None:
        while self._commands:
            future, _ = self._commands.popleft()
            if future.set_running_or_notify_cancel():
                error = RuntimeError("the engine's step loop is not running" +
                                     (" (it failed)" if self._error is not None else ""))
                error.__cause__ = self._error
                future.set_exception(error)

    def _add(self, prompt, params, loop, queue) -> RequestOutput:
        out = self.llm._add(prompt, params or SamplingParams())
        if out.error is None:
            self._streams[out.request_id] = (loop, queue, out)
        return out

    def _abort(self, request_id: str) -> None:
        prefix = f"{request_id}:"
        for rid in [r for r in self.llm._sequences if r.startswith(prefix)]:
            self.llm.scheduler.abort(rid)
            self.llm._complete(self.llm._sequences[rid], time.perf_counter())
        self._publish()

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._run_commands()
                if self.llm.has_work():
                    self.llm._step()
                    self._publish()
                else:
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
        except BaseException as error:  # never leave streams waiting: fail them all, free blocks
            self._error = error
            self._fail_all(error)
        finally:
            self._reject_commands()

    def _publish(self) -> None:
        """Send each stream its new tokens (on the step thread); close the finished ones."""
        for request_id, (loop, queue, out) in list(self._streams.items()):
            new = {}
            for completion in range(len(out.outputs)):
                rid = f"{request_id}:{completion}"
                seq = self.llm._sequences.get(rid)
                tokens = seq.request.output_token_ids if seq is not None else out.outputs[completion].token_ids
                sent = self._sent.get(rid, 0)
                if len(tokens) > sent:
                    new[completion] = list(tokens[sent:])
                    self._sent[rid] = len(tokens)
            finished = not any(f"{request_id}:{i}" in self.llm._sequences for i in range(len(out.outputs)))
            if new or finished:
                loop.call_soon_threadsafe(queue.put_nowait, StreamOutput(request_id, new, finished, out))
            if finished:
                self.llm._record_metrics(out)
                del self._streams[request_id]
                for i in range(len(out.outputs)):
                    self._sent.pop(f"{request_id}:{i}", None)

    def _fail_all(self, error: BaseException) -> None:
        for rid in list(self.llm._sequences):
            self.llm.scheduler.abort(rid)
            self.llm._complete(self.llm._sequences[rid], time.perf_counter())
        for loop, queue, _ in self._streams.values():
            loop.call_soon_threadsafe(queue.put_nowait, error)
        self._streams.clear()
