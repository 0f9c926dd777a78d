"""The attention of one layer inside a runtime step: the op the attention pass puts in place of a model's attention.

    torch.ops.fastllm.step_attention(q, k, v, context, layer, scale, ...)
        q: [1, Hq, T, D], k/v: [1, Hkv, T, D] → [1, Hq, T, D]

The batch is the runtime's flattened ragged batch (all sequences' tokens in one row of T). Besides q, k and v the op
reads its step's `StepContext`: the KV-cache tensors and the batch's attention metadata, which the model runner sets
around each forward. The graph names the context by an integer id (custom ops take no Python objects), so a captured
graph stays tied to one model's context without importing the runtime: passes emit this op by name, the runtime
fills the context. Inside a CUDA graph the metadata tensors are the runner's static buffers, refilled before each
replay.

Each step writes this step's K/V into the paged cache at the metadata's slots, then every token attends over its
sequence's cached context through the block table. Without metadata (the compile step's profiling forward, one
causal sequence and no cache) it runs plain causal attention and records each layer's KV shape for sizing the cache.

The op writes the KV cache, which its schema does not show: fastllm runs captured graphs as Python, never through
a compiler that would reorder or drop it (its result is always used).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastllm.kernels._registry import LIBRARY, pdl_options, use_triton
from fastllm.kernels.kv_cache_write import (
    rotary_and_write_kv,
    rotary_and_write_kv_ref,
    write_kv_cache,
    write_kv_cache_ref,
)
from fastllm.kernels.paged_attention import paged_attention, paged_attention_ref
from fastllm.kernels.rotary import rotary_embedding

# The module itself (fastllm.kernels exports the function under the same name): its FUSE_ROTARY_INTO_DECODE is read
# at each step, so benchmarks and tests can switch it.
paged_attention_kernels = sys.modules["fastllm.kernels.paged_attention"]


@dataclass
class AttentionMetadata:
    """A flattened ragged batch of T tokens from N sequences."""

    slot_mapping: torch.Tensor   # [T] int64: cache slot of each token's K/V; < 0 = padding, not written
    block_tables: torch.Tensor   # [N, max_blocks] int32
    seq_lens: torch.Tensor       # [N] int32: context length including this step's tokens
    cu_seqlens_q: torch.Tensor   # [N + 1] int32: query offsets of each sequence in the batch
    max_seqlen_q: int            # static upper bound of the query lengths (no host read of tensors)


# Contexts by id. Weak: the captured graph names its context by id only, and the context lives exactly as long as
# the compiled step that owns it (a dropped model leaves nothing behind here).
_CONTEXTS: weakref.WeakValueDictionary[int, StepContext] = weakref.WeakValueDictionary()
_context_ids = itertools.count()


class StepContext:
    """What the attention ops of one model's steps read besides q, k, v. One per compiled step (per model).

    `metadata` None means a profiling forward: plain causal attention over one sequence, each layer's
    (num_kv_heads, head_dim) recorded in `shapes`.
    """

    def __init__(self) -> None:
        self.id = next(_context_ids)
        self.metadata: AttentionMetadata | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.shapes: dict[int, tuple[int, int]] | None = None
        # Per layer, an FP8 KV cache's (k_scale, v_scale) multipliers (a checkpoint's); None: 1.0 everywhere. Set
        # once by the runner that owns the caches: the values are fixed for the model's life.
        self.kv_scales: list[tuple[float, float]] | None = None
        # During kv_scales="auto"'s calibration prefill (ModelRunner.measure_kv_amax): [num layers, 2] fp32, the
        # largest |K| (rotated, as the cache holds it) and |V| each layer has written so far; None otherwise.
        self.kv_amax: torch.Tensor | None = None
        self.active = False
        self._alibi: dict[tuple, torch.Tensor] = {}
        self._split_counters: torch.Tensor | None = None
        _CONTEXTS[self.id] = self

    @contextlib.contextmanager
    def step(self, metadata: AttentionMetadata | None, kv_caches=None,
             shapes: dict[int, tuple[int, int]] | None = None) -> Iterator[StepContext]:
        """Make this the context of the forward run inside the block."""
        if self.active:
            raise RuntimeError("a step of this model is already running (steps of one model must not overlap; "
                               "fastllm's engine core serializes them)")
        self.metadata, self.kv_caches, self.shapes, self.active = metadata, kv_caches, shapes, True
        try:
            yield self
        finally:
            self.metadata, self.kv_caches, self.shapes, self.active = None, None, None, False

    def alibi_tensor(self, slopes: tuple[float, ...], device: torch.device) -> torch.Tensor:
        # Made once, by the first (eager) step: graph capture then records a tensor that lives as long as the context.
        key = (slopes, device)
        if key not in self._alibi:
            self._alibi[key] = torch.tensor(slopes, dtype=torch.float32, device=device)
        return self._alibi[key]

    def split_counters(self, entries: int, device: torch.device) -> torch.Tensor | None:
        """Zeroed int32 counters for decode attention's in-kernel split merge (paged_attention's split_counters), at
        least `entries`. Every layer of every step shares them: the kernel leaves them zero, and this model's kernels
        run one after another. Made (or grown) outside graph capture, so a captured graph records a tensor that lives
        as long as the context; during capture a too-small buffer gives None (the combine kernel runs instead; the
        warm-up step before each capture makes that not happen)."""
        held = self._split_counters
        if held is None or held.device != device or held.numel() < entries:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            held = self._split_counters = torch.zeros(max(entries, 1024), dtype=torch.int32, device=device)
        return held


def _context(context: int) -> StepContext:
    ctx = _CONTEXTS.get(context)
    if ctx is None or not ctx.active:
        raise RuntimeError("fastllm attention ran outside a runtime step of its model (no step context is set)")
    return ctx


def step_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext, layer: int, scale: float,
                       sliding_window: int | None = None, softcap: float | None = None,
                       cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, interleaved: bool = False,
                       alibi: tuple[float, ...] | None = None) -> torch.Tensor:
    """The op's computation (its kernels dispatch to Triton on CUDA and to their references on the CPU).

    q and k are taken in v's dtype (the cache's): a model that upcasts them before its attention (GPT-J computes
    its scores in fp32) would otherwise hand the kernels mixed dtypes; the kernels accumulate in fp32 anyway."""
    if q.dtype != v.dtype or k.dtype != v.dtype:
        q, k = q.to(v.dtype), k.to(v.dtype)
    if ctx.metadata is None:
        if cos is not None:
            q = rotary_embedding(q, cos, sin, interleaved=interleaved)
            k = rotary_embedding(k, cos, sin, interleaved=interleaved)
        if ctx.shapes is not None:
            ctx.shapes[layer] = (k.shape[1], k.shape[3])
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    md = ctx.metadata
    k_cache, v_cache = ctx.kv_caches[layer]
    q_tokens, k_tokens, v_tokens = (t[0].transpose(0, 1) for t in (q, k, v))  # [T, H, D] views
    # On the CPU the references are called directly: the caches and metadata are the runtime's own tensors, and the
    # launchers' argument checks were a third of a SmolLM2 decode step's Python time on 2 cores.
    kernels = use_triton(q)
    write, rotate_and_write = (write_kv_cache, rotary_and_write_kv) if kernels else (write_kv_cache_ref,
                                                                                      rotary_and_write_kv_ref)
    k_scale, v_scale = ctx.kv_scales[layer] if ctx.kv_scales is not None else (1.0, 1.0)
    if ctx.kv_amax is not None:
        _observe_kv(ctx.kv_amax, layer, k_tokens if cos is None else
                    rotary_embedding(k, cos, sin, interleaved=interleaved), v_tokens)
    slopes = None if alibi is None else ctx.alibi_tensor(tuple(alibi), q.device)
    if cos is not None:
        cos, sin = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, cos.shape[-1])
    fuse_rotary = paged_attention_kernels.FUSE_ROTARY_INTO_DECODE
    if fuse_rotary is None:  # where the step's launches use PDL (paged_attention says why)
        fuse_rotary = kernels and bool(pdl_options(q_tokens))
    if kernels and md.max_seqlen_q == 1 and cos is not None and cos.dtype == q_tokens.dtype and fuse_rotary:
        # decode: rotary, the KV write and attention (its splits merged) in one launch
        out = paged_attention_kernels.decode_attention_with_rotary(
            q_tokens, k_tokens, v_tokens, cos, sin, k_cache, v_cache, md.slot_mapping, md.block_tables, md.seq_lens,
            md.cu_seqlens_q, scale=scale * k_scale, interleaved=interleaved, k_scale=k_scale, v_scale=v_scale,
            sliding_window=sliding_window, softcap=softcap, alibi_slopes=slopes,
            split_counters=ctx.split_counters(md.seq_lens.shape[0] * k_cache.shape[2], q.device))
        return out.transpose(0, 1).unsqueeze(0)
    if cos is None:
        write(k_tokens, v_tokens, k_cache, v_cache, md.slot_mapping, k_scale=k_scale, v_scale=v_scale)
    else:
        q_tokens = rotate_and_write(q_tokens, k_tokens, v_tokens, cos, sin, k_cache, v_cache, md.slot_mapping,
                                    interleaved=interleaved, k_scale=k_scale, v_scale=v_scale)
    # K's multiplier scales every score: folded into the score scale (exactly so when it is 1.0)
    if not kernels:
        out = paged_attention_ref(
            q_tokens, k_cache, v_cache, md.block_tables, md.seq_lens, md.cu_seqlens_q, md.max_seqlen_q,
            scale=scale * k_scale, causal=True, sliding_window=sliding_window, softcap=softcap, alibi_slopes=slopes,
            v_scale=v_scale)
        return out.transpose(0, 1).unsqueeze(0)
    counters = None
    if md.max_seqlen_q == 1:  # decode: its splits merged in the decode kernel
        counters = ctx.split_counters(md.seq_lens.shape[0] * k_cache.shape[2], q.device)
    out = paged_attention(
        q_tokens, k_cache, v_cache, md.block_tables, md.seq_lens, md.cu_seqlens_q, md.max_seqlen_q,
        scale=scale * k_scale, causal=True, sliding_window=sliding_window, softcap=softcap, alibi_slopes=slopes,
        v_scale=v_scale, split_counters=counters)
    return out.transpose(0, 1).unsqueeze(0)


def _observe_kv(kv_amax: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    seen = torch.stack([k.abs().amax().float(), v.abs().amax().float()]) if k.numel() else kv_amax[layer]
    kv_amax[layer] = torch.maximum(kv_amax[layer], seen)


LIBRARY.define("step_attention(Tensor q, Tensor k, Tensor v, int context, int layer, float scale, "
               "int? sliding_window=None, float? softcap=None, Tensor? cos=None, Tensor? sin=None, "
               "bool interleaved=False, float[]? alibi=None) -> Tensor")


def step_attention_direct(q, k, v, context, layer, scale, sliding_window=None, softcap=None, cos=None, sin=None,
                          interleaved=False, alibi=None):
    """The op's implementation, callable without the dispatcher (CPU graphs call it directly: ~27 µs a call saved,
    passes/reference_ops.py)."""
    return step_attention_ref(q, k, v, _context(context), layer, scale, sliding_window, softcap, cos, sin,
                              interleaved, alibi)


for _key in ("CPU", "CUDA"):
    LIBRARY.impl("step_attention", step_attention_direct, _key)


@torch.library.register_fake("fastllm::step_attention", lib=LIBRARY)
def _step_attention_fake(q, k, v, context, layer, scale, sliding_window=None, softcap=None, cos=None, sin=None,
                         interleaved=False, alibi=None):
    return torch.empty_like(q)


step_attention = torch.ops.fastllm.step_attention.default

__all__ = ["AttentionMetadata", "StepContext", "step_attention", "step_attention_direct", "step_attention_ref"]
