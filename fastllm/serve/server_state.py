"""What every route of the server shares: the engine, the model's names, and the helpers that run requests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

import anyio
from fastapi import HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from fastllm.serve.engine import Admission, Delta, ServingEngine


class ClientGone(Exception):
    """The client disconnected before its (non-streaming) request finished: the request was aborted."""


@dataclass
class ServerState:
    serving: ServingEngine
    model_name: str
    aliases: tuple[str, ...] = ()
    started: int = field(default_factory=lambda: int(time.time()))
    metrics: object | None = None   # serve/metrics.py's ServerMetrics

    def names(self) -> tuple[str, ...]:
        return (self.model_name, *self.aliases)


class MergedStreams:
    """One engine request per prompt, run at once, their updates merged as (prompt index, deltas, output).

    `await start()` waits for every request's first update, so that a request the engine refuses (ValueError) or a
    model step that fails before the first token (EngineFault) is raised before a streaming response has sent its
    200; iterating then yields what start() read, and the rest as it comes. `aclose()` aborts every request."""

    def __init__(self, serving: ServingEngine, prompts: list, params: list, request_id: str) -> None:
        self._read: list[tuple] = []  # items start() took, yielded first
        self._remaining = len(prompts)
        self._single = None
        self._tasks: list[asyncio.Task] = []
        if len(prompts) == 1:  # the common case, without a pump task and a queue hop per update
            self._single = serving.stream(prompts[0], params[0], f"{request_id}-0")
        else:
            self._queue: asyncio.Queue = asyncio.Queue()
            self._tasks = [asyncio.ensure_future(self._pump(i, serving.stream(prompt, p, f"{request_id}-{i}")))
                           for i, (prompt, p) in enumerate(zip(prompts, params))]

    async def _pump(self, index: int, stream: AsyncIterator) -> None:
        try:
            async for deltas, output in stream:
                self._queue.put_nowait((index, deltas, output))
            self._queue.put_nowait((index, None, None))  # this prompt's request ended
        except BaseException as error:  # re-raised by the consumer
            self._queue.put_nowait(error)
            raise

    async def _next(self) -> tuple:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def start(self) -> None:
        if self._single is not None:
            first = await anext(self._single, None)
            if first is not None:
                self._read.append((0, *first))
            return
        waiting = set(range(len(self._tasks)))
        while waiting:
            item = await self._next()
            self._read.append(item)
            waiting.discard(item[0])

    async def __aiter__(self) -> AsyncIterator[tuple[int, list[Delta], object]]:
        if self._single is not None:
            while self._read:
                yield self._read.pop(0)
            async for deltas, output in self._single:
                yield 0, deltas, output
            return
        while self._remaining:
            index, deltas, output = self._read.pop(0) if self._read else await self._next()
            if deltas is None:
                self._remaining -= 1
            else:
                yield index, deltas, output

    async def aclose(self) -> None:
        if self._single is not None:
            await self._single.aclose()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def started_streams(request: Request, admission: Admission, serving: ServingEngine, prompts: list, params: list,
                          request_id: str) -> MergedStreams:
    """MergedStreams for a streaming response, started (every request accepted and under way); if that fails or the
    client goes away first, the requests are aborted, `admission` is given back and the error raised."""
    streams = MergedStreams(serving, prompts, params, request_id)
    try:
        await until_disconnected(request, streams.start())
    except BaseException:
        admission.release()
        await streams.aclose()
        raise
    return streams


def max_tokens_for(serving: ServingEngine, requested: int | None, prompt_tokens: int, name: str = "max_tokens") -> int:
    """A request's max_tokens checked against the context (OpenAI's messages): None fills what the context leaves.
    `name`: the field the request gave it in (a chat request's max_completion_tokens), for the messages."""
    room = serving.max_model_len - prompt_tokens
    if room < 1:
        raise ValueError(f"This model's maximum context length is {serving.max_model_len} tokens; the prompt has "
                         f"{prompt_tokens}, which leaves no room for a completion")
    if requested is None:
        return room
    if isinstance(requested, bool) or requested < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {requested!r}")
    if requested > room:
        raise ValueError(f"This model's maximum context length is {serving.max_model_len} tokens. However, you "
                         f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} "
                         f"in the completion). Please reduce the prompt or {name}.")
    return requested


async def prompt_token_ids(serving: ServingEngine, prompt) -> list[int]:
    """A prompt's token ids: a text is tokenized off the event loop (`ServingEngine.tokenize`)."""
    return await serving.tokenize(prompt) if isinstance(prompt, str) else list(prompt)


async def run_to_end(serving: ServingEngine, prompts, params, request_id: str) -> list:
    """Every prompt's final RequestOutput (the prompts run at once, batched by the engine)."""

    async def one(i):
        output = None
        async for _, output in serving.stream(prompts[i], params[i], f"{request_id}-{i}"):
            pass
        return output

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
    try:
        return await asyncio.gather(*tasks)
    finally:
        # gather leaves the other prompts' requests running when one fails (the engine refused it): the response
        # is an error and the admission slots go back, so they would run to max_tokens for nobody. Cancelled, they
        # abort and free their KV blocks.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def check_model(state: ServerState, name: str) -> None:
    if name not in state.names():
        raise HTTPException(404, f"The model `{name}` does not exist; this server serves {state.model_name!r}")


def sse(data: dict) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data)}\n\n"


async def until_disconnected(request: Request, work: Awaitable):
    """Await `work`, unless the client disconnects first: then `work` is cancelled (its requests abort, their KV
    blocks go back) and ClientGone is raised. The disconnect is awaited, not polled: a thousand requests waiting for
    their first token would otherwise spend the event loop on checks (Starlette's `is_disconnected()` opens a cancel
    scope per call)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone("the client disconnected; its request was aborted")
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone. The body was read before the route ran, so the server's next message is the
    disconnect (uvicorn sends it when the connection closes or the response has been sent)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def released_after(admission: Admission, stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """`stream`, then the request's admission slots given back (also when the client goes away mid-stream)."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        admission.release()
        await stream.aclose()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body iterator however the response ends.

    Starlette's leaves the iterator suspended at its `yield` when the client leaves while a chunk is being sent (the
    response's task is cancelled in `send`, outside the iterator), and under load that is where the task mostly waits.
    Nothing then closed the request's stream until the garbage collector found it: its engine request ran to its end
    for nobody, and its admission slots stayed taken (38 of 50 after 50 concurrent clients left after their first
    chunk, 2 CPU cores; the server answers 503 once they are all taken)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # closing awaits (aborts, task ends), also when we were cancelled
                await self.body_iterator.aclose()
