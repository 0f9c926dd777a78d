"""What every route of the server shares: the engine, the model's names, and the helpers that run requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

from fastapi import HTTPException, Request

from fastllm.serve.engine import Admission, Delta, ServingEngine

# How often a non-streaming request checks whether its client is still connected.
DISCONNECT_POLL_S = 0.1


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

    async def merged_streams(self, prompts: list, params: list, request_id: str
                             ) -> AsyncIterator[tuple[int, list[Delta], object]]:
        """Run one engine request per prompt at once; yields (prompt index, deltas, output) as they come. Closing the
        iterator aborts every prompt's request."""
        if len(prompts) == 1:  # the common case, without a pump task and a queue hop per update
            async with contextlib.aclosing(self.serving.stream(prompts[0], params[0], f"{request_id}-0")) as stream:
                async for deltas, output in stream:
                    yield 0, deltas, output
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int) -> None:
            try:
                async for deltas, output in self.serving.stream(prompts[i], params[i], f"{request_id}-{i}"):
                    await queue.put((i, deltas, output))
                await queue.put(done)
            except BaseException as error:  # re-raised by the consumer
                await queue.put(error)
                raise

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(prompts))]
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
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
    blocks go back) and ClientGone is raised."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            finished, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if finished:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone("the client disconnected; its request was aborted")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def released_after(admission: Admission, stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """`stream`, then the request's admission slots given back (also when the client goes away mid-stream)."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        admission.release()
        await stream.aclose()
