"""The forward context: what the attention ops of one model step read besides their q, k, v.

The captured graph calls `fastllm.runtime.attention.attention(q, k, v, layer=i, ...)`; the model runner sets
the context (cache tensors and the batch's attention metadata) around each forward. Inside a CUDA graph the
metadata tensors are the runner's static buffers, refilled before each replay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """A flattened ragged batch of T tokens from N sequences."""

    slot_mapping: torch.Tensor   # [T] int64: cache slot of each token's K/V; < 0 = padding, not written
    block_tables: torch.Tensor   # [N, max_blocks] int32
    seq_lens: torch.Tensor       # [N] int32: context length including this step's tokens
    cu_seqlens_q: torch.Tensor   # [N + 1] int32: query offsets of each sequence in the batch
    max_seqlen_q: int            # static upper bound of the query lengths (no host read of tensors)


@dataclass
class ForwardContext:
    metadata: AttentionMetadata | None               # None: a plain causal forward, nothing cached
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None
    shapes: dict[int, tuple[int, int]] | None = None  # filled by a profiling forward: layer -> (Hkv, D)


_current: ForwardContext | None = None


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _current
    previous, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = previous


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("fastllm attention ran outside a model-runner step (no forward context is set)")
    return _current
