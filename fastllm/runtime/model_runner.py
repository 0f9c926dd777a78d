"""The model runner: owns the KV cache and the step buffers, runs one scheduled batch per call.

The model is captured once more for the runtime, called as HF would be on a flattened ragged batch
(`input_ids [1, T]`, `position_ids [1, T]`, no HF cache) with `logits_to_keep` = the rows to sample, and its
attention replaced by paged attention (passes/attention.py). Everything but attention is token-wise, so one
graph serves prefill, decode and mixed steps. On CUDA, decode-only steps replay a CUDA graph captured per
batch-size bucket, padded to the bucket.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fastllm.capture import capture
from fastllm.passes import RUNTIME_PASSES, run_passes
from fastllm.passes._context import WeightMerger
from fastllm.runtime.context import AttentionMetadata, ForwardContext, forward_context
from fastllm.runtime.kv_cache import BlockPool, KVCacheConfig, allocate_kv_cache, plan_num_blocks

_PROFILE_TOKENS = 256


# Dynamo specializes sizes equal to 1; the runner never hands the graph one (a lone token or sampled row is
# padded to 2), so a single capture with symbolic sizes serves every step and nothing recaptures later.
MIN_BATCH = 2


def decode_buckets(max_num_seqs: int) -> list[int]:
    """CUDA-graph batch sizes: 2, 4, 8, then every 8 up to max_num_seqs."""
    top = max(max_num_seqs, MIN_BATCH)
    sizes = [b for b in (2, 4) if b < top] + list(range(8, top + 8, 8))
    return sorted({min(b, top) for b in sizes})


@dataclass
class StepInput:
    """One step's batch on the host, in the order of the scheduler's chunks."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    seq_lens: list[int]
    query_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]   # index (in the batch's token order) of each token whose logits are sampled

    @classmethod
    def from_chunks(cls, chunks) -> StepInput:
        step = cls([], [], [], [], [], [], [])
        for chunk in chunks:
            step.token_ids += chunk.token_ids
            step.positions += range(chunk.start, chunk.start + chunk.num_tokens)
            step.slots += chunk.slots
            step.seq_lens.append(chunk.start + chunk.num_tokens)
            step.query_lens.append(chunk.num_tokens)
            step.block_tables.append(chunk.request.block_table.blocks)
            if chunk.samples:
                step.sample_rows.append(len(step.token_ids) - 1)
        return step

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.query_lens)


class ModelRunner:
    def __init__(self, model, *, kv_cache: KVCacheConfig | None = None, max_num_seqs: int = 64,
                 max_model_len: int | None = None, use_cuda_graph: bool | None = None, transform=None,
                 hf_forward=None):
        """
        Args:
            transform: `(gm, tensors) -> gm` run on each captured graph; default: every pass, attention
                included. It must replace the attention (passes/attention.py) for the runtime to work.
            hf_forward: the model's own forward (default `model.forward`).
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

        self._step = capture(step, transform, dynamic=True)
        self.kv_shapes = self._profile()
        if not self.kv_shapes:
            raise NotImplementedError(f"{type(model).__name__}'s attention is not an SDPA call that fastllm can page "
                                      "(no attention call matched)")
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
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}
        self.buckets = decode_buckets(max_num_seqs)
        if self.use_cuda_graph:
            self._capture_decode_graphs()

    @torch.no_grad()
    def _profile(self) -> list[tuple[int, int]]:
        """A plain causal forward: captures the graph and records each layer's (num_kv_heads, head_dim)."""
        ids = torch.zeros(1, _PROFILE_TOKENS, dtype=torch.long, device=self.device)
        positions = torch.arange(_PROFILE_TOKENS, device=self.device).unsqueeze(0)
        shapes: dict[int, tuple[int, int]] = {}
        with forward_context(ForwardContext(metadata=None, kv_caches=None, shapes=shapes)):
            # Two sampled rows, not one: dynamo specializes sizes of 1, and decode steps sample several rows.
            self._step(ids, positions, torch.tensor([_PROFILE_TOKENS - 2, _PROFILE_TOKENS - 1], device=self.device))
        if len({s for s in shapes.values()}) > 1:
            raise NotImplementedError("layers with different KV shapes are not supported yet")
        return [shapes[i] for i in sorted(shapes)]

    def _device_inputs(self, step: StepInput, num_tokens: int, num_seqs: int) -> tuple[dict, AttentionMetadata]:
        """Host lists → device tensors, padded with `num_tokens - T` one-token dummy sequences.

        A dummy token writes no cache slot and attends to slot 0 of block 0; its output is never read.
        """
        pad_t, pad_s = num_tokens - len(step.token_ids), num_seqs - len(step.seq_lens)
        assert pad_t == pad_s >= 0, (pad_t, pad_s)
        width = self.max_blocks_per_seq if self.use_cuda_graph else max(len(b) for b in step.block_tables)
        # One host tensor from padded lists: a per-row torch.tensor would cost a call per sequence per step.
        rows = [blocks + [0] * (width - len(blocks)) for blocks in step.block_tables] + [[0] * width] * pad_s
        tables = torch.tensor(rows, dtype=torch.int32)
        cu = [0]
        for n in step.query_lens + [1] * pad_s:
            cu.append(cu[-1] + n)

        def dev(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        rows = step.sample_rows + step.sample_rows[-1:] * (MIN_BATCH - len(step.sample_rows))
        host = {
            "input_ids": dev(step.token_ids + [0] * pad_t, torch.long).unsqueeze(0),
            "positions": dev(step.positions + [0] * pad_t, torch.long).unsqueeze(0),
            "logits_indices": dev(rows, torch.long),
        }
        metadata = AttentionMetadata(
            slot_mapping=dev(step.slots + [-1] * pad_t, torch.long),
            block_tables=tables.to(self.device, non_blocking=True),
            seq_lens=dev(step.seq_lens + [1] * pad_s, torch.int32),
            cu_seqlens_q=dev(cu, torch.int32),
            max_seqlen_q=max(step.query_lens),
        )
        return host, metadata

    @torch.no_grad()
    def execute(self, chunks) -> torch.Tensor:
        """Run one scheduled step; returns the logits of the sampled rows, [num sampled, vocab], fp32 (owned)."""
        step = StepInput.from_chunks(chunks)
        n = len(step.seq_lens)
        if self.use_cuda_graph and step.is_decode and n <= self.buckets[-1]:
            return self._replay(step)
        pad = max(0, MIN_BATCH - len(step.token_ids))
        inputs, metadata = self._device_inputs(step, len(step.token_ids) + pad, n + pad)
        with forward_context(ForwardContext(metadata, self.kv_caches)):
            logits = self._step(inputs["input_ids"], inputs["positions"], inputs["logits_indices"])
        return logits[0, :len(step.sample_rows)].float()

    # CUDA graphs ---------------------------------------------------------------------------------------------

    def _capture_decode_graphs(self) -> None:
        start = time.perf_counter()
        pool = None
        for size in tqdm(sorted(self.buckets, reverse=True), desc="fastllm: capturing CUDA graphs", leave=False):
            buffers = {
                "input_ids": torch.zeros(1, size, dtype=torch.long, device=self.device),
                "positions": torch.zeros(1, size, dtype=torch.long, device=self.device),
                "logits_indices": torch.arange(size, device=self.device),
            }
            metadata = AttentionMetadata(
                slot_mapping=torch.full((size,), -1, dtype=torch.long, device=self.device),
                block_tables=torch.zeros(size, self.max_blocks_per_seq, dtype=torch.int32, device=self.device),
                seq_lens=torch.ones(size, dtype=torch.int32, device=self.device),
                cu_seqlens_q=torch.arange(size + 1, dtype=torch.int32, device=self.device),
                max_seqlen_q=1,
            )
            ctx = ForwardContext(metadata, self.kv_caches)
            with forward_context(ctx):
                # Warm-up outside the graph: dynamo captures this shape here, never during graph capture.
                self._step(buffers["input_ids"], buffers["positions"], buffers["logits_indices"])
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._step(buffers["input_ids"], buffers["positions"], buffers["logits_indices"])
            pool = graph.pool()
            self._graphs[size] = (graph, {**buffers, "metadata": metadata}, logits)
        torch.cuda.synchronize(self.device)
        self.cuda_graph_seconds = time.perf_counter() - start

    def _replay(self, step: StepInput) -> torch.Tensor:
        n = len(step.seq_lens)
        size = self.buckets[bisect.bisect_left(self.buckets, n)]
        graph, buffers, logits = self._graphs[size]
        md: AttentionMetadata = buffers["metadata"]
        inputs, fresh = self._device_inputs(step, size, size)
        buffers["input_ids"].copy_(inputs["input_ids"])
        buffers["positions"].copy_(inputs["positions"])
        md.slot_mapping.copy_(fresh.slot_mapping)
        md.block_tables.copy_(fresh.block_tables)
        md.seq_lens.copy_(fresh.seq_lens)
        graph.replay()
        # A copy: `logits` is the graph's static output, overwritten by the next replay (and `.float()` of an
        # fp32 tensor is the tensor itself), while callers keep scores across steps.
        return logits[0, :n].to(torch.float32, copy=True)
