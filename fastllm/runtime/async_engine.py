"""`AsyncLLM`: many concurrent requests, each streamed token by token, on one background step loop.

    engine = AsyncLLM(LLM(model, tokenizer=tokenizer))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32)):
        print(out.new_token_ids, out.finished)

The model steps run in one background thread (a step blocks on the GPU); requests are added and aborted
from the event loop under a lock shared with that thread, and each step's new tokens are handed back to
the loop with `call_soon_threadsafe`. Requests join and leave between steps: in-flight batching.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
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
        self._lock = threading.Lock()
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
        with self._lock:
            if self._error is not None:
                raise RuntimeError("the engine's step loop failed") from self._error
            out = self.llm._add(prompt, sampling_params or SamplingParams())
            if out.error is None:
                self._streams[out.request_id] = (loop, queue, out)
        if out.error is not None:
            yield StreamOutput(out.request_id, {}, True, out)
            return
        self._wake.set()
        while True:
            update = await queue.get()
            if isinstance(update, BaseException):
                raise RuntimeError("the engine's step loop failed") from update
            yield update
            if update.finished:
                return

    def abort(self, request_id: str) -> None:
        """Stop a request now: its blocks are freed at once and its stream ends with finish_reason "abort"."""
        with self._lock:
            prefix = f"{request_id}:"
            for rid in [r for r in self.llm._sequences if r.startswith(prefix)]:
                self.llm.scheduler.abort(rid)
                self.llm._complete(self.llm._sequences[rid], time.perf_counter())
            self._publish()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- the step thread ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped:
            with self._lock:
                busy = self.llm.scheduler.has_unfinished()
                if busy:
                    try:
                        self.llm._step()
                    except BaseException as error:  # never leave streams waiting: fail them all, free blocks
                        self._error = error
                        self._fail_all(error)
                        return
                    self._publish()
            if not busy:
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    def _publish(self) -> None:
        """Send each stream its new tokens (under the lock); close the finished ones."""
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
