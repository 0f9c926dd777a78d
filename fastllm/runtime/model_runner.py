"""The model runner: owns the KV cache and the step buffers, runs one scheduled batch per call.

It runs the model's compiled step (capture/step.py: the forward on a flattened ragged batch, attention replaced by
`fastllm::step_attention`), setting the step's context (KV caches and attention metadata) around each forward. It
captures nothing itself: it sizes and allocates the KV cache from the compiled step's KV shapes and records CUDA
graphs of the step. On CUDA, steps replay CUDA graphs, padded to the graph's shape (runtime/step_inputs.py):
decode-only steps one per batch-size bucket, prefill and mixed steps one per token-count bucket up to
MAX_PREFILL_GRAPH_TOKENS; larger steps run eagerly (their GPU time hides the launches).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fastllm.runtime.kv_cache import BlockPool, KVCacheConfig, allocate_kv_cache, plan_num_blocks
from fastllm.runtime.step_inputs import StepBuffers, StepInput

# Dynamo specializes sizes equal to 1; the runner never hands the graph one (a lone token or sampled row is
# padded to 2), so a single capture with symbolic sizes serves every step and nothing recaptures later.
MIN_BATCH = 2


# Prefill and mixed steps up to this many tokens replay CUDA graphs too: below it a step's GPU time is shorter
# than launching its few hundred kernels from Python (a 128-token Llama-2-7B prefill: 6 ms of GPU, ~40 ms eager).
MAX_PREFILL_GRAPH_TOKENS = 1024


def decode_buckets(max_num_seqs: int) -> list[int]:
    """CUDA-graph batch sizes of decode steps: 2, 4, 8, then every 8 up to max_num_seqs."""
    top = max(max_num_seqs, MIN_BATCH)
    sizes = [b for b in (2, 4) if b < top] + list(range(8, top + 8, 8))
    return sorted({min(b, top) for b in sizes})


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
    """A CUDA graph of one step shape, its input buffers and its (static) logits output. `graph` is None when
    the shapes are only emulated (CPU tests of the padding): such a step runs eagerly on the same buffers."""

    buffers: StepBuffers
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class ModelRunner:
    """Runs steps of one model's compiled step over its paged KV cache.

    Args:
        compiled: the model's `CompiledStep` (capture/step.py).
        device, dtype: where and in which dtype the model's weights (and so the cache) live.
        kv_cache: how big the cache is (`KVCacheConfig`).
        max_num_seqs: most sequences in one step (the largest decode CUDA graph).
        max_model_len: longest sequence; capped at what the cache holds.
        use_cuda_graph: replay steps from CUDA graphs (default: on CUDA).
        max_num_batched_tokens: the step budget (bounds the prefill graphs' token counts).
        emulate_graph_shapes: without CUDA graphs, still pad every step to a graph's shape (CPU tests).
    """

    def __init__(self, compiled, device: torch.device, dtype: torch.dtype, *, kv_cache: KVCacheConfig | None = None,
                 max_num_seqs: int = 64, max_model_len: int = 4096, use_cuda_graph: bool | None = None,
                 max_num_batched_tokens: int = 8192, emulate_graph_shapes: bool = False):
        self.compiled = compiled
        self.device, self.dtype = torch.device(device), dtype
        self.max_num_seqs = max_num_seqs
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        self.kv_shapes = compiled.kv_shapes
        # Seconds of each start-up phase (W3's profile): the KV cache sized and allocated, the CUDA graphs captured.
        self.startup_seconds: dict[str, float] = {}
        start = time.perf_counter()
        num_kv_heads, head_dim = self.kv_shapes[0]
        config = kv_cache or KVCacheConfig()
        num_blocks = plan_num_blocks(config, device=self.device, num_layers=len(self.kv_shapes),
                                     num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=self.dtype)
        self.block_size = config.block_size
        self.pool = BlockPool(num_blocks, self.block_size)
        # A sequence can never outgrow the cache: cap the context there (validation then names the limit).
        self.max_model_len = min(max_model_len, num_blocks * self.block_size)
        self.kv_caches = allocate_kv_cache(len(self.kv_shapes), num_blocks, self.block_size, num_kv_heads, head_dim,
                                           self.dtype, self.device)
        self.startup_seconds["kv_cache"] = time.perf_counter() - start
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.buckets = decode_buckets(max_num_seqs)
        self.token_buckets = prefill_buckets(max_num_batched_tokens)
        # The last step's sampled tokens, on the device (asynchronous scheduling): a pending token's id is read
        # from here inside the next step. One row per sampled token: a step samples at most one per token.
        self.feed = torch.zeros(max(max_num_batched_tokens, max_num_seqs) + 1, dtype=torch.long, device=self.device)
        self._decode_graphs: list[StepGraph] = []
        self._prefill_graphs: list[StepGraph] = []
        if self.use_cuda_graph or emulate_graph_shapes:
            self._make_step_graphs(capture=self.use_cuda_graph)

    def _forward(self, buffers: StepBuffers) -> torch.Tensor:
        with self.compiled.context.step(buffers.metadata, self.kv_caches):
            return self.compiled(buffers.input_ids, buffers.positions, buffers.logits_indices)

    def execute(self, chunks, feed_rows: dict | None = None) -> torch.Tensor:
        """Run one scheduled step; returns the logits of the sampled rows, [num sampled, vocab], fp32 (owned).

        `feed_rows`: request id -> row of `self.feed` holding its pending token (see `set_feed`)."""
        return self.execute_input(StepInput.from_chunks(chunks, feed_rows))

    @torch.no_grad()
    def execute_input(self, step: StepInput) -> torch.Tensor:
        """`execute` of a step already laid out (`StepInput`): the logits of its `sample_rows`, fp32 (owned)."""
        graph = self._graph_for(step)
        if graph is None:
            buffers = StepBuffers.for_step(step, self.device, MIN_BATCH, feed=self.feed)
        else:
            buffers = graph.buffers
        buffers.fill(step)
        num_rows = len(step.sample_rows)
        if graph is not None and graph.graph is not None:
            graph.graph.replay()  # scatter() is recorded in the graph
            # A copy: the graph's static output is overwritten by the next replay, while callers keep scores
            # across steps (and `.float()` of an fp32 tensor would be the tensor itself).
            return graph.logits[0, :num_rows].to(torch.float32, copy=True)
        buffers.scatter()
        logits = self._forward(buffers)
        return logits[0, :num_rows].float()

    def set_feed(self, token_ids: torch.Tensor) -> None:
        """Make `token_ids` (a step's sampled tokens, on the device) the ids of the next step's pending tokens:
        row i of the feed is token_ids[i]. Ordered on the stream after the sampling, before the next step."""
        self.feed[:token_ids.shape[0]].copy_(token_ids)

    # CUDA graphs ---------------------------------------------------------------------------------------------

    def _graph_for(self, step: StepInput) -> StepGraph | None:
        """The smallest step graph `step` fits in, or None (run eagerly)."""
        candidates = self._decode_graphs if step.is_decode else ()
        for graph in (*candidates, *self._prefill_graphs):
            if graph.buffers.fits(step):
                return graph
        return None

    @torch.no_grad()  # as execute(): a grad-mode change would make dynamo trace the step again
    def _make_step_graphs(self, capture: bool) -> None:
        """Buffers for every bucket and, with `capture`, their CUDA graphs (largest first, one memory pool)."""
        width = self.max_blocks_per_seq
        self._decode_graphs = [
            StepGraph(StepBuffers(n, n, n, width, self.device, one_token_dummies=True, max_seqlen_q=1,
                                  feed=self.feed))
            for n in self.buckets
        ]
        self._prefill_graphs = []
        for n in self.token_buckets:
            seqs = min(n, self.max_num_seqs) + 1  # + 1: a dummy sequence holds the padding tokens
            self._prefill_graphs.append(StepGraph(
                StepBuffers(n, seqs, seqs, width, self.device, one_token_dummies=False, max_seqlen_q=n,
                            feed=self.feed)))
        if not capture:
            return
        start = time.perf_counter()
        pool = None
        graphs = sorted(self._decode_graphs + self._prefill_graphs, key=lambda g: -g.buffers.num_tokens)
        for step_graph in tqdm(graphs, desc="fastllm: capturing CUDA graphs", leave=False):
            b = step_graph.buffers
            b.fill(StepInput([], [], [], [], [], [], []))  # all dummies: valid metadata for the warm-up and capture
            # Warm-up outside the graph: anything still to compile or allocate does it here, not in capture.
            b.scatter()
            self._forward(b)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                b.scatter()
                step_graph.logits = self._forward(b)
            step_graph.graph = graph
            pool = graph.pool()
        torch.cuda.synchronize(self.device)
        self.cuda_graph_seconds = self.startup_seconds["cuda_graphs"] = time.perf_counter() - start

    @property
    def _graphs(self) -> dict[tuple[str, int], StepGraph]:
        """The captured graphs by (kind, num_tokens), for tests and benchmarks."""
        return {(kind, g.buffers.num_tokens): g for kind, graphs in (("decode", self._decode_graphs),
                                                                      ("prefill", self._prefill_graphs))
                for g in graphs if g.graph is not None}
