"""Sampled tokens back to the host without waiting for the GPU (asynchronous scheduling).

A `.tolist()` on a CUDA tensor waits for every kernel queued before the copy, including the next step's, which
async scheduling has already launched. Instead the copy goes to pinned memory with `non_blocking=True` right
after the sampling, an event marks it, and the host waits for that event only when it needs the tokens.
"""

from __future__ import annotations

import torch


class HostTokens:
    """One pinned buffer for the tokens of the step in flight (one step at a time is in flight)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._pinned: torch.Tensor | None = None

    def start(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Queue the copy of `tokens` ([n] int64); returns (host tensor, event recorded after the copy or None on
        the CPU, where `tokens` is returned as it is)."""
        if not tokens.is_cuda:
            return tokens, None
        if self._pinned is None:
            self._pinned = torch.empty(self.capacity, dtype=torch.long, pin_memory=True)
        host = self._pinned[:tokens.shape[0]].copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    @staticmethod
    def read(host: torch.Tensor, ready: torch.cuda.Event | None) -> list[int]:
        """The tokens, once their copy is done."""
        if ready is not None:
            ready.synchronize()
        return host.tolist()
