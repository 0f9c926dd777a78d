"""The model runner: owns the KV cache and the step buffers, runs one scheduled batch per call.

The model is captured once more for the runtime, called as HF would be on a flattened ragged batch
(`input_ids [1, T]`, `position_ids [1, T]`, no HF cache) with `logits_to_keep` = the rows to sample, and its
attention replaced by paged attention (passes/attention.py). Everything but attention is token-wise, so one
graph serves prefill, decode and mixed steps. On CUDA, steps replay CUDA graphs, padded to the graph's shape
(runtime/step_inputs.py): decode-only steps one per batch-size bucket, prefill and mixed steps one per token-count
bucket up to MAX_PREFILL_GRAPH_TOKENS; larger steps run eagerly (their GPU time hides the launches).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fastllm.capture import capture
from fastllm.capture.graph_cache import cache_key
from fastllm.passes import RUNTIME_PASSES, run_passes
from fastllm.passes._context import WeightMerger
from fastllm.runtime.context import ForwardContext, forward_context
from fastllm.runtime.kv_cache import BlockPool, KVCacheConfig, allocate_kv_cache, plan_num_blocks
from fastllm.runtime.step_inputs import StepBuffers, StepInput

_PROFILE_TOKENS = 256


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
    def __init__(self, model, *, kv_cache: KVCacheConfig | None = None, max_num_seqs: int = 64,
                 max_model_len: int | None = None, use_cuda_graph: bool | None = None, transform=None,
                 hf_forward=None, max_num_batched_tokens: int = 8192, emulate_graph_shapes: bool = False,
                 graph_cache: bool = True):
        """
        Args:
            transform: `(gm, tensors) -> gm` run on each captured graph; default: every pass, attention
                included. It must replace the attention (passes/attention.py) for the runtime to work.
            hf_forward: the model's own forward (default `model.forward`).
            max_num_batched_tokens: the step budget (bounds the prefill graphs' token counts).
            emulate_graph_shapes: without CUDA graphs, still pad every step to a graph's shape (CPU tests).
            graph_cache: keep the captured graph on disk and reuse it in later processes (capture/graph_cache.py).
        """
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.config = model.config
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len or getattr(model.config, "max_position_embeddings", None) or 4096
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        hf_forward = hf_forward or model.forward
        if transform is None:
            merger = WeightMerger()

            def transform(gm, tensors):
                run_passes(gm, tensors, merger, tuple(RUNTIME_PASSES), model.config)
                return gm

        def step(input_ids, position_ids, logits_indices):
            out = hf_forward(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                             logits_to_keep=logits_indices)
            return out.logits

        key = cache_key(step, model, hf_forward) if graph_cache else None
        self._step = capture(step, transform, dynamic=True, cache_key=key)
        self.graph_from_cache = getattr(self._step, "from_graph_cache", False)
        # Seconds of each start-up phase (W3's profile): the first call traces the model with dynamo and runs the
        # passes ("capture"), then the KV cache is sized and allocated, then the CUDA graphs are captured.
        self.startup_seconds: dict[str, float] = {}
        start = time.perf_counter()
        self.kv_shapes = self._profile()
        self.startup_seconds["capture"] = time.perf_counter() - start
        if not self.kv_shapes:
            raise NotImplementedError(f"{type(model).__name__}'s attention could not be paged: neither an SDPA call "
                                      "nor hand-written attention that fastllm recognises (or a score bias that is "
                                      "neither a mask nor ALiBi declared by the config)")
        start = time.perf_counter()
        num_kv_heads, head_dim = self.kv_shapes[0]
        config = kv_cache or KVCacheConfig()
        num_blocks = plan_num_blocks(config, device=self.device, num_layers=len(self.kv_shapes),
                                     num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=self.dtype)
        self.block_size = config.block_size
        self.pool = BlockPool(num_blocks, self.block_size)
        # A sequence can never outgrow the cache: cap the context there (validation then names the limit).
        self.max_model_len = min(self.max_model_len, num_blocks * self.block_size)
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

    @torch.no_grad()
    def _profile(self) -> list[tuple[int, int]]:
        """A plain causal forward: captures the graph and records each layer's (num_kv_heads, head_dim)."""
        ids = torch.zeros(1, _PROFILE_TOKENS, dtype=torch.long, device=self.device)
        # Inputs laid out as every later step's (plain tensors, not views): dynamo guards on view bases too.
        positions = torch.arange(_PROFILE_TOKENS, device=self.device).unsqueeze(0).clone()
        shapes: dict[int, tuple[int, int]] = {}
        with forward_context(ForwardContext(metadata=None, kv_caches=None, shapes=shapes)):
            # Two sampled rows, not one: dynamo specializes sizes of 1, and decode steps sample several rows.
            self._step(ids, positions, torch.tensor([_PROFILE_TOKENS - 2, _PROFILE_TOKENS - 1], device=self.device))
        if len({s for s in shapes.values()}) > 1:
            raise NotImplementedError("layers with different KV shapes are not supported yet")
        return [shapes[i] for i in sorted(shapes)]

    @torch.no_grad()
    def execute(self, chunks, feed_rows: dict | None = None) -> torch.Tensor:
        """Run one scheduled step; returns the logits of the sampled rows, [num sampled, vocab], fp32 (owned).

        `feed_rows`: request id -> row of `self.feed` holding its pending token (see `set_feed`)."""
        step = StepInput.from_chunks(chunks, feed_rows)
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
        with forward_context(ForwardContext(buffers.metadata, self.kv_caches)):
            logits = self._step(buffers.input_ids, buffers.positions, buffers.logits_indices)
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
            with forward_context(ForwardContext(b.metadata, self.kv_caches)):
                # Warm-up outside the graph: anything still to compile or allocate does it here, not in capture.
                b.scatter()
                self._step(b.input_ids, b.positions, b.logits_indices)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    b.scatter()
                    step_graph.logits = self._step(b.input_ids, b.positions, b.logits_indices)
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
