"""Asynchronous scheduling's step mechanics, shared by `generate()` and the engine.

The host runs a step ahead of the GPU: it schedules and launches step N+1 before reading step N's sampled tokens.
Step N+1's rows for those tokens hold placeholders (`Scheduler.update_pending`); the runner reads the real ids on
the device from its feed buffer, filled by `set_feed` right after step N's sampling, so nothing waits. The tokens
come back to the host through pinned memory and an event (host_copy.py); once read, `Scheduler.resolve` appends
them and applies the stop rules, a step late. A request that step N's tokens ended still has a row in step N+1:
its logits are dropped before sampling (wasted computation, never a wrong token).

Per step the caller: `launch(output)`, `collect()`, `live_rows(...)`, samples its own way (the engine per
request's parameters, generate() as HF does), then `start(output, items, tokens)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastllm.runtime.host_copy import HostTokens
from fastllm.runtime.sampler import on_device
from fastllm.runtime.scheduler import SchedulerOutput


@dataclass
class InFlight:
    """A step launched and sampled on the device whose tokens the host has not read yet."""

    output: SchedulerOutput
    items: list                      # the caller's objects of the sampled rows, in row order
    tokens: torch.Tensor             # [n] pinned host copy being filled, or the tokens themselves (CPU runs)
    ready: torch.cuda.Event | None   # recorded after the copy


class OverlappedSteps:
    """One step in flight at a time. `request_id(item)` names the scheduler request of a caller's item."""

    def __init__(self, scheduler, runner, request_id: Callable[[object], int]):
        self.scheduler, self.runner, self.request_id = scheduler, runner, request_id
        self.inflight: InFlight | None = None
        self._host_tokens = HostTokens(runner.feed.shape[0])

    def launch(self, output: SchedulerOutput) -> torch.Tensor | None:
        """Run `output`'s step, its pending tokens read from the in-flight step's; its logits, or None if empty."""
        if not output.chunks:
            return None
        feed = ({self.request_id(item): row for row, item in enumerate(self.inflight.items)}
                if self.inflight is not None else None)
        return self.runner.execute(output.chunks, feed)

    def collect(self) -> tuple[list, list[int]]:
        """(items, tokens) of the in-flight step, waiting for them if needed, appended through the scheduler with
        its stop rules; ([], []) if no step is in flight."""
        inflight, self.inflight = self.inflight, None
        if inflight is None:
            return [], []
        tokens = HostTokens.read(inflight.tokens, inflight.ready)
        self.scheduler.resolve(inflight.output, {self.request_id(item): t for item, t in zip(inflight.items, tokens)})
        return inflight.items, tokens

    @staticmethod
    def live_rows(logits: torch.Tensor, items: list, is_live: Callable[[object], bool]) -> tuple[torch.Tensor, list]:
        """The logits rows and items of the still-live items (the ones the tokens just collected did not end)."""
        keep = [i for i, item in enumerate(items) if is_live(item)]
        if len(keep) < len(items):
            logits = logits.index_select(0, on_device(keep, torch.long, logits.device))
        return logits, [items[i] for i in keep]

    def start(self, output: SchedulerOutput, items: list, tokens: torch.Tensor) -> None:
        """Put `output`'s step in flight with its sampled `tokens` ([n] on the device, one per item)."""
        self.runner.set_feed(tokens)
        self.scheduler.update_pending(output)
        self.inflight = InFlight(output, items, *self._host_tokens.start(tokens))

    def drop(self) -> None:
        """Forget the in-flight step (a step failed: the requests it ran are being aborted); the requests of it that
        go on give their pending tokens back, to sample them again."""
        if self.inflight is not None:
            self.scheduler.forget_pending(self.inflight.output)
        self.inflight = None
