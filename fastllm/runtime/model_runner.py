"""The model runner: owns the KV cache, the step buffers and the CUDA graphs; runs one scheduled batch per call.

It runs the model's compiled step (capture/step.py: the forward on a flattened ragged batch, attention replaced by
`fastllm::step_attention`), setting the step's context (KV caches and attention metadata) around each forward. It
captures nothing itself.

The KV cache starts small and grows on demand (`grow`, called by the block pool when free blocks run short) up to a
cap: the share of the card the config allows, less what is in use and what a step's activations need (measured once
by a step of the largest size). Growing reallocates the cache tensors (copying what they hold) and drops the CUDA
graphs, which recorded the old tensors' addresses.

On CUDA, steps replay CUDA graphs, padded to the graph's shape (runtime/step_inputs.py): decode-only steps one per
batch-size bucket, prefill and mixed steps one per token-count bucket up to MAX_PREFILL_GRAPH_TOKENS; larger steps run
eagerly (their GPU time hides the launches). A bucket's graph is captured the first time a step needs it, so the
buckets a workload never uses cost neither start-up time nor memory. All graphs share one memory pool (they never
replay at once) and write their logits into one shared buffer, not one buffer each.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import torch

from fastllm.kernels._registry import FP8_KV_DTYPE
from fastllm.kernels.compile_ahead import run_compiling_ahead
from fastllm.runtime.kv_cache import (
    BlockPool,
    KVCacheConfig,
    KVCacheTooLarge,
    allocate_kv_cache,
    blocks_needed,
    kv_cache_bytes_per_block,
    max_num_blocks,
)
from fastllm.runtime.step_inputs import StepBuffers, StepInput

# CUDA memory left free when the cache grows (the allocator's fragmentation, other streams' work).
GROWTH_MARGIN_BYTES = 1 << 30
# Activations are measured on one step of the largest size; CUDA graphs of smaller steps hold their own pool on top.
ACTIVATION_HEADROOM = 1.25

# Dynamo specializes sizes equal to 1; the runner never hands the graph one (a lone token or sampled row is
# padded to 2), so a single capture with symbolic sizes serves every step and nothing recaptures later.
MIN_BATCH = 2


class StepTooLarge(ValueError, torch.OutOfMemoryError):
    """The start-up step of `max_num_batched_tokens` tokens (whose activations size the KV cache) did not fit in the
    device's memory. A ValueError, since the number is out of range for this device (the CLI prints one line), and
    the allocator's OutOfMemoryError, which callers catching it expect."""


# Prefill and mixed steps up to this many tokens replay CUDA graphs too: below it a step's GPU time is shorter
# than launching its few hundred kernels from Python (a 128-token Llama-2-7B prefill: 6 ms of GPU, ~40 ms eager).
MAX_PREFILL_GRAPH_TOKENS = 1024


# Decode steps of one sequence get their own 1-row graph: padded to MIN_BATCH's 2 rows, batch-1 decode (W1) paid a
# second row in every GEMV, whose tiles were tuned at 1 row. Measured on an H200 (W1, Llama-3.1-8B shape,
# 2026-11-30, one call): 218.9 tok/s with the 1-row graph against 208.1 padded. Safe for the trace: the step is traced
# once, by the first call (a prefill, or the activation measurement: never one row), and later calls bind the traced
# graph directly (capture/dynamo.py), with its sizes symbolic. FASTLLM_ONE_ROW_DECODE=0 pads again (one graph fewer).
ONE_ROW_DECODE = os.environ.get("FASTLLM_ONE_ROW_DECODE", "1") != "0"


def decode_buckets(max_num_seqs: int, one_row: bool = False) -> list[int]:
    """CUDA-graph batch sizes of decode steps: 2, 4, 8, then every 8 up to 256, every 16 up to 512, every 32 beyond
    (up to max_num_seqs); `one_row`: 1 first. A step pads to the next size: at most 8 rows up to 256 sequences
    (memory-bound decode, where rows are nearly free) and at most 1/16 of the rows beyond (compute-bound), while 1024
    sequences need 66 graphs, not 130."""
    top = max(max_num_seqs, MIN_BATCH)
    sizes = [*([1] if one_row else []), 2, 4, *range(8, 257, 8), *range(272, 513, 16), *range(544, top + 32, 32)]
    return sorted({min(b, top) for b in sizes if b < top} | {top})


def prefill_buckets(max_num_batched_tokens: int) -> list[int]:
    """CUDA-graph token counts of prefill and mixed steps: 16, 32, ... up to MAX_PREFILL_GRAPH_TOKENS (or the step
    budget, if smaller)."""
    top = min(MAX_PREFILL_GRAPH_TOKENS, max_num_batched_tokens)
    sizes, size = [], 16
    while size < top:
        sizes.append(size)
        size *= 2
    return sizes + [top] if top >= 16 else []


@dataclass
class StepGraph:
    """One step shape: its input buffers (made when a step first needs them) and, once captured, its CUDA graph.
    `graph` stays None where the shapes are only emulated (CPU tests of the padding): such a step runs eagerly on
    the same buffers."""

    spec: dict                           # StepBuffers' arguments: num_tokens, num_seqs, num_rows, ...
    _buffers: StepBuffers | None = None
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None   # a view of the runner's shared logits buffer, filled by each replay

    @property
    def num_tokens(self) -> int:
        return self.spec["num_tokens"]

    @property
    def buffers(self) -> StepBuffers:
        if self._buffers is None:
            self._buffers = StepBuffers(**self.spec)
        return self._buffers

    def fits(self, step: StepInput) -> bool:
        s = self.spec
        return StepBuffers.shape_fits(step, s["num_tokens"], s["num_seqs"], s["num_rows"], s["one_token_dummies"])


class ModelRunner:
    """Runs steps of one model's compiled step over its paged KV cache.

    Args:
        compiled: the model's `CompiledStep` (capture/step.py).
        device, dtype: where and in which dtype the model's weights (and so, by default, the cache) live.
        kv_cache_dtype: the cache's dtype when it is not `dtype`: torch.float8_e4m3fn for an FP8 KV cache.
        kv_cache: how big the cache starts and may grow (`KVCacheConfig`).
        max_num_seqs: most sequences in one step (the largest decode CUDA graph); capped by `cache_limits()`.
        max_model_len: longest sequence; capped at what the cache may hold.
        use_cuda_graph: replay steps from CUDA graphs (default: on CUDA).
        max_num_batched_tokens: the step budget (bounds the prefill graphs' token counts, and is the size whose
            activations are measured); capped by `cache_limits()` after that measurement.
        emulate_graph_shapes: without CUDA graphs, still pad every step to a graph's shape (CPU tests).
        one_row_decode: a 1-row decode graph for steps of one sequence (default: `ONE_ROW_DECODE`).
    """

    def __init__(self, compiled, device: torch.device, dtype: torch.dtype, *, kv_cache: KVCacheConfig | None = None,
                 max_num_seqs: int = 64, max_model_len: int = 4096, use_cuda_graph: bool | None = None,
                 max_num_batched_tokens: int = 8192, emulate_graph_shapes: bool = False,
                 kv_cache_dtype: torch.dtype | None = None, kv_scales: list[tuple[float, float]] | None = None,
                 one_row_decode: bool | None = None):
        self.compiled = compiled
        self.device, self.dtype = torch.device(device), dtype
        self.kv_cache_dtype = kv_cache_dtype or dtype
        if kv_scales is not None:  # an FP8 KV cache's per-layer (k_scale, v_scale), a checkpoint's
            self._check_kv_scales(kv_scales)
        compiled.context.kv_scales = kv_scales
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        self.kv_shapes = compiled.kv_shapes
        self.config = kv_cache or KVCacheConfig()
        self.block_size = self.config.block_size
        num_kv_heads, head_dim = self.kv_shapes[0]
        self.bytes_per_block = kv_cache_bytes_per_block(len(self.kv_shapes), num_kv_heads, head_dim, self.block_size,
                                                        self.kv_cache_dtype)
        # Seconds of each start-up phase (W3's profile): the KV cache sized and allocated, the CUDA graphs captured.
        self.startup_seconds: dict[str, float] = {"kv_cache": 0.0, "cuda_graphs": 0.0}
        start = time.perf_counter()
        initial = self.config.initial_blocks()
        try:
            self.kv_caches = self._allocate(initial)
        except RuntimeError as error:  # torch.OutOfMemoryError on CUDA; the CPU allocator's RuntimeError
            if not self.config.fixed:
                raise
            # A size the user gave: say which number asked for how much, not the allocator's C++ message alone
            raise KVCacheTooLarge(f"num_kv_tokens={self.config.num_kv_tokens}: its KV cache ({initial} blocks of "
                                  f"{self.block_size} tokens, {initial * self.bytes_per_block / 2**30:.1f} GiB on "
                                  f"{self.device}) could not be allocated ({str(error).splitlines()[0][:200]}); "
                                  f"give fewer tokens, or leave num_kv_tokens unset to size the cache from free "
                                  f"memory") from error
        # The feed (below) is sized for the capped numbers, known only once the cache is: the measuring step has
        # no pending token to read from it.
        self.feed: torch.Tensor | None = None
        try:
            self.activation_bytes = self._measure_activations(initial, max_model_len) if self._measures_memory else 0
        except torch.OutOfMemoryError as error:
            self.kv_caches = []
            torch.cuda.empty_cache()
            # The number to change, not only the allocator's message (max_num_batched_tokens=10**9 ended there)
            raise StepTooLarge(f"max_num_batched_tokens={self.max_num_batched_tokens}: a step of that many tokens "
                               f"does not fit in {self.device}'s free memory beside the model "
                               f"({str(error).splitlines()[0][:200]}); give fewer tokens a step") from error
        cap = max_num_blocks(self.config, device=self.device, bytes_per_block=self.bytes_per_block,
                             held_blocks=initial, reserved_bytes=int(ACTIVATION_HEADROOM * self.activation_bytes))
        self.pool = BlockPool(initial, self.block_size, max_num_blocks=max(cap, initial), grow=self.grow)
        # A sequence can never outgrow the cache: cap the context there (validation then names the limit).
        self.max_model_len = min(max_model_len, self.pool.max_num_blocks * self.block_size)
        # Nor can more sequences run than the cache has blocks (each holds one at least), nor a step compute more
        # tokens than it has slots (each computed token's K and V are written): the buffers, decode and prefill
        # buckets and logits rows below are sized for what can run, not for any number asked (EngineCore caps its
        # scheduler's too). (The activation measurement above ran before the cache existed, with the number asked.)
        most_seqs, most_tokens = self.cache_limits()
        self.max_num_seqs = max_num_seqs = min(max_num_seqs, most_seqs)
        self.max_num_batched_tokens = max_num_batched_tokens = min(max_num_batched_tokens, most_tokens)
        # The last step's sampled tokens, on the device (asynchronous scheduling): a pending token's id is read
        # from here inside the next step. One row per sampled token: a step samples at most one per token.
        self.feed = torch.zeros(max(max_num_batched_tokens, max_num_seqs) + 1, dtype=torch.long, device=self.device)
        self.startup_seconds["kv_cache"] = time.perf_counter() - start
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.buckets = decode_buckets(max_num_seqs, ONE_ROW_DECODE if one_row_decode is None else one_row_decode)
        self.token_buckets = prefill_buckets(max_num_batched_tokens)
        self._decode_graphs: list[StepGraph] = []
        self._prefill_graphs: list[StepGraph] = []
        self._graph_pool = None
        self._logits_buffer: torch.Tensor | None = None
        if self.use_cuda_graph or emulate_graph_shapes:
            self._make_step_buffers()

    @property
    def _measures_memory(self) -> bool:
        return self.device.type == "cuda" and not self.config.fixed

    # ---- the KV cache ----------------------------------------------------------------------------------------

    def _allocate(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        num_kv_heads, head_dim = self.kv_shapes[0]
        return allocate_kv_cache(len(self.kv_shapes), num_blocks, self.block_size, num_kv_heads, head_dim,
                                 self.kv_cache_dtype, self.device)

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens the cache holds now (it may grow to `pool.max_num_blocks * block_size`)."""
        return self.kv_caches[0][0].shape[0] * self.block_size

    def grow(self, num_blocks: int) -> int:
        """Make the cache hold up to `num_blocks` blocks; returns how many it holds now. The block pool calls this
        when free blocks run short. The blocks' contents are kept (copied into the new tensors); the CUDA graphs
        are dropped (they recorded the old tensors) and captured again as steps need them. Grows less, or not at
        all, when the device's free memory cannot hold the new tensors beside the old ones."""
        held = self.kv_caches[0][0].shape[0]
        if num_blocks <= held:
            return held
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            num_blocks = min(num_blocks, (free - GROWTH_MARGIN_BYTES) // self.bytes_per_block)
            if num_blocks <= held:
                return held
        start = time.perf_counter()
        new = self._allocate(num_blocks)
        for (k_old, v_old), (k_new, v_new) in zip(self.kv_caches, new):
            k_new[:held].copy_(k_old)
            v_new[:held].copy_(v_old)
        self.kv_caches = new
        self._drop_graphs()
        self.startup_seconds["kv_cache"] += time.perf_counter() - start
        return num_blocks

    def cache_limits(self) -> tuple[int, int]:
        """(most sequences running at once, most tokens one step computes) that the cache can hold at its cap: a
        running sequence holds a block at least, and every token a step computes takes a slot."""
        return self.pool.max_num_blocks, self.pool.max_num_blocks * self.block_size

    def reserve(self, memory_fraction: float | None = None) -> int:
        """Grow the cache to its cap now (a server's reservation); returns the blocks it holds. `memory_fraction`
        recomputes the cap first (see `KVCacheConfig.kv_cache_memory_fraction`; never below what is held)."""
        if memory_fraction is not None and not self.config.fixed:
            config = KVCacheConfig(self.block_size, memory_fraction)
            held = self.pool.num_blocks
            self.pool.max_num_blocks = max_num_blocks(
                config, device=self.device, bytes_per_block=self.bytes_per_block, held_blocks=held,
                reserved_bytes=int(ACTIVATION_HEADROOM * self.activation_bytes))
        self.pool.try_grow(self.pool.max_num_blocks - self.pool.num_blocks)
        return self.pool.num_blocks

    @torch.no_grad()
    def _measure_activations(self, num_blocks: int, max_model_len: int) -> int:
        """Peak bytes one eager step of `max_num_batched_tokens` tokens allocates beyond what is held: a dummy
        sequence that writes no cache slot and reads block 0, sampling `max_num_seqs` rows. Its positions stay below
        max_model_len (they may be fewer than the tokens): the step reads per-position tables (rope_table's, learned
        position embeddings) that end there."""
        tokens = max(self.max_num_batched_tokens, MIN_BATCH)
        rows = min(tokens, max(self.max_num_seqs, MIN_BATCH))
        positions = [i % max_model_len for i in range(tokens)]
        step = StepInput([0] * tokens, positions, [-1] * tokens, [tokens], [tokens],
                         [[0] * blocks_needed(tokens, self.block_size)], list(range(tokens - rows, tokens)))
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        # Its kernels compiled side by side (kernels/compile_ahead.py): a dry run's output goes before the real run.
        run_compiling_ahead(self.execute_input, step, capture=False, device=self.device)
        torch.cuda.synchronize(self.device)
        peak = max(0, torch.cuda.max_memory_allocated(self.device) - base)
        torch.cuda.empty_cache()  # what the step allocated goes back: a generate() user holds only what it needs
        return peak

    @torch.no_grad()
    def measure_kv_amax(self, token_ids: list[int]) -> torch.Tensor:
        """kv_scales="auto"'s calibration (quant/kv_scales.py picks the scales): one eager, unscaled prefill of
        `token_ids` (the first `max_num_batched_tokens`, within `max_model_len`); returns [num layers, 2] fp32 on
        the CPU, each layer's largest |K| (rotated, as the cache holds it) and |V|. The prefill's blocks go back to
        the pool (its scores are not used)."""
        if self.kv_cache_dtype != FP8_KV_DTYPE:
            raise ValueError(f"KV cache scales apply to an FP8 KV cache; this one holds {self.kv_cache_dtype}")
        ids = list(token_ids)[:min(self.max_num_batched_tokens, self.max_model_len)]
        n = len(ids)
        context = self.compiled.context
        blocks = self.pool.allocate(blocks_needed(n, self.block_size))
        slots = [blocks[i // self.block_size] * self.block_size + i % self.block_size for i in range(n)]
        scales, context.kv_scales = context.kv_scales, None  # measured unscaled: what the scales are for
        context.kv_amax = torch.zeros(len(self.kv_shapes), 2, dtype=torch.float32, device=self.device)
        try:
            self.execute_input(StepInput(ids, list(range(n)), slots, [n], [n], [blocks], [n - 1]), capture=False)
            return context.kv_amax.cpu()
        finally:
            context.kv_amax, context.kv_scales = None, scales
            self.pool.free(blocks)

    def set_kv_scales(self, kv_scales: list[tuple[float, float]]) -> None:
        """An FP8 cache's (k_scale, v_scale) per layer, before any CUDA graph records a launch with the old ones."""
        self._check_kv_scales(kv_scales)
        if self._graphs:
            raise RuntimeError("KV cache scales must be set before any CUDA graph is captured (graphs keep them)")
        self.compiled.context.kv_scales = list(kv_scales)

    def _check_kv_scales(self, kv_scales: list[tuple[float, float]]) -> None:
        layers = len(self.compiled.kv_shapes)
        if self.kv_cache_dtype != FP8_KV_DTYPE or len(kv_scales) != layers:
            raise ValueError(f"kv_scales: one (k_scale, v_scale) pair per layer ({layers}) for an FP8 KV cache; got "
                             f"{len(kv_scales)} pairs for a {self.kv_cache_dtype} cache")

    def kv_cache_info(self) -> dict:
        """What the cache holds now and may grow to, for reports."""
        return {"tokens": self.kv_cache_tokens, "bytes": self.kv_caches[0][0].shape[0] * self.bytes_per_block,
                "max_tokens": self.pool.max_num_blocks * self.block_size,
                "max_bytes": self.pool.max_num_blocks * self.bytes_per_block, "growths": self.pool.num_growths,
                "activation_bytes": self.activation_bytes,
                "dtype": str(self.kv_cache_dtype).removeprefix("torch."),
                "scales": self.compiled.context.kv_scales}  # an FP8 cache's (k_scale, v_scale) per layer, or None

    def close(self) -> None:
        """Let go of every tensor and graph this runner holds (the model, the compiled step, stay)."""
        self._drop_graphs()
        self._decode_graphs, self._prefill_graphs = [], []
        self.kv_caches = []
        self.feed = torch.empty(0, dtype=torch.long, device=self.device)
        self._logits_buffer = None

    def _forward(self, buffers: StepBuffers) -> torch.Tensor:
        with self.compiled.context.step(buffers.metadata, self.kv_caches):
            return self.compiled(buffers.input_ids, buffers.positions, buffers.logits_indices)

    def execute(self, chunks, feed_rows: dict | None = None) -> torch.Tensor:
        """Run one scheduled step; returns the logits of the sampled rows, [num sampled, vocab], fp32 (owned).

        `feed_rows`: request id -> row of `self.feed` holding its pending token (see `set_feed`)."""
        return self.execute_input(StepInput.from_chunks(chunks, feed_rows))

    @torch.no_grad()
    def execute_input(self, step: StepInput, capture: bool = True) -> torch.Tensor:
        """`execute` of a step already laid out (`StepInput`): the logits of its `sample_rows`, fp32 (owned).
        `capture=False` runs it eagerly whatever its shape."""
        graph = self._graph_for(step) if capture else None
        if graph is None:
            buffers = StepBuffers.for_step(step, self.device, MIN_BATCH, feed=self.feed)
        else:
            if graph.graph is None and self.use_cuda_graph:
                self._capture(graph)
            buffers = graph.buffers
        buffers.fill(step)
        num_rows = len(step.sample_rows)
        if graph is not None and graph.graph is not None:
            graph.graph.replay()  # scatter() is recorded in the graph
            # A copy: the shared static output is overwritten by the next replay, while callers keep scores
            # across steps (and `.float()` of an fp32 tensor would be the tensor itself).
            return graph.logits[0, :num_rows].to(torch.float32, copy=True)
        buffers.scatter()
        logits = self._forward(buffers)
        return logits[0, :num_rows].float()

    def set_feed(self, token_ids: torch.Tensor) -> None:
        """Make `token_ids` (a step's sampled tokens, on the device) the ids of the next step's pending tokens:
        row i of the feed is token_ids[i]. Ordered on the stream after the sampling, before the next step. A row
        whose sampling failed (sampler.NO_TOKEN, -1) is fed token 0: never an index outside the embedding, and the
        engine drops that row's next step."""
        torch.clamp(token_ids, min=0, out=self.feed[:token_ids.shape[0]])

    # CUDA graphs ---------------------------------------------------------------------------------------------

    def _graph_for(self, step: StepInput) -> StepGraph | None:
        """The smallest step graph `step` fits in, or None (run eagerly)."""
        candidates = self._decode_graphs if step.is_decode else ()
        for graph in (*candidates, *self._prefill_graphs):
            if graph.fits(step):
                return graph
        return None

    def _make_step_buffers(self) -> None:
        """Every bucket's step shape; its static buffers are made, and its graph captured, when a step first needs
        them (a bucket no step uses costs nothing: 1024 sequences' buckets hold 2 MB of block tables each)."""
        common = dict(max_blocks=self.max_blocks_per_seq, device=self.device, feed=self.feed)
        self._decode_graphs = [StepGraph(dict(num_tokens=n, num_seqs=n, num_rows=n, one_token_dummies=True,
                                              max_seqlen_q=1, **common)) for n in self.buckets]
        self._prefill_graphs = []
        for n in self.token_buckets:
            seqs = min(n, self.max_num_seqs) + 1  # + 1: a dummy sequence holds the padding tokens
            self._prefill_graphs.append(StepGraph(dict(num_tokens=n, num_seqs=seqs, num_rows=seqs,
                                                       one_token_dummies=False, max_seqlen_q=n, **common)))

    @torch.no_grad()  # as execute(): a grad-mode change would make dynamo trace the step again
    def _capture(self, step_graph: StepGraph) -> None:
        """Record `step_graph`'s CUDA graph (into the runner's one graph pool, its logits into the shared buffer).
        A model whose step cannot be recorded (an op that reads host memory) runs every step eagerly from then on,
        with one warning: correct, slower."""
        start = time.perf_counter()
        b = step_graph.buffers
        b.fill(StepInput([], [], [], [], [], [], []))  # all dummies: valid metadata for the warm-up and capture
        # Warm-up outside the graph: anything still to compile or allocate does it here, not in capture.
        b.scatter()
        warm = run_compiling_ahead(self._forward, b, device=self.device)
        if self._logits_buffer is None:
            rows = max(self.max_num_seqs, MIN_BATCH) + 1  # the most rows any bucket samples
            self._logits_buffer = torch.empty(1, rows, warm.shape[-1], dtype=warm.dtype, device=self.device)
        del warm
        torch.cuda.synchronize(self.device)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._graph_pool):
                b.scatter()
                logits = self._forward(b)
                self._logits_buffer[:, :logits.shape[1]].copy_(logits)
        except RuntimeError as error:
            self.use_cuda_graph = False
            self._drop_graphs()
            warnings.warn(f"fastllm: a CUDA graph of this model's step could not be recorded, so its steps run "
                          f"eagerly (correct, slower): {str(error).splitlines()[0][:300]}", RuntimeWarning,
                          stacklevel=4)
            return
        # The step's own output is let go: its memory returns to the pool, for the next graph's capture to reuse.
        step_graph.logits = self._logits_buffer[:, :logits.shape[1]]
        step_graph.graph = graph
        self.startup_seconds["cuda_graphs"] += time.perf_counter() - start

    def _drop_graphs(self) -> None:
        """Forget every captured graph (and the pool they share): after the cache tensors changed, or at close."""
        for g in (*self._decode_graphs, *self._prefill_graphs):
            g.graph, g.logits = None, None
        self._graph_pool = None

    def capture_all(self) -> None:
        """Capture every bucket's graph now (largest first), e.g. to time start-up as a whole."""
        for step_graph in sorted(self._decode_graphs + self._prefill_graphs, key=lambda g: -g.num_tokens):
            if step_graph.graph is None and self.use_cuda_graph:
                self._capture(step_graph)

    @property
    def _graphs(self) -> dict[tuple[str, int], StepGraph]:
        """The captured graphs by (kind, num_tokens), for tests and benchmarks."""
        return {(kind, g.num_tokens): g for kind, graphs in (("decode", self._decode_graphs),
                                                              ("prefill", self._prefill_graphs))
                for g in graphs if g.graph is not None}
