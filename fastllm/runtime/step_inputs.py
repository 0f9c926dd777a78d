"""One step's batch: host lists from the scheduler's chunks, padded and packed into device buffers.

A step's device inputs arrive in three tensors so that the host→device transfer is three copies whatever the
batch: one int64 staging buffer (token ids | positions | cache slots | sampled rows | token sources: where a
pending token's id is read from on the device, for asynchronous scheduling), one int32 buffer (sequence
lengths | query offsets) and the block tables. The attention metadata are views of them. The model's own inputs
(token ids, positions, sampled rows) are separate tensors that `scatter()` fills from the staging buffer: views
at storage offsets would make dynamo guard on the offsets (and recompile when a bucket's sizes relate
differently). A CUDA graph records `scatter()` with the step, so a replay needs only the three copies.

Padding (graphs have fixed shapes; dynamo specializes sizes of 0 and 1, so eager steps are padded too):
- decode-shaped buffers (`num_tokens == num_seqs`, one query per sequence): each padding token is a one-token
  dummy sequence;
- prefill-shaped buffers (`num_seqs > num_tokens` is not required): the first dummy sequence takes every padding
  token, the others are empty. The prefill kernel's grid depends on the token and sequence counts only, so an
  empty sequence costs one program that exits. Buffers with no room for a dummy sequence (eager steps, sized to
  their step) leave the padding tokens in no sequence at all.
A dummy token writes no cache slot (slot -1) and attends to the cache's block 0; its outputs are never read.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from fastllm.kernels.step_attention import AttentionMetadata
from fastllm.runtime.scheduler import PLACEHOLDER


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
    # Per token: -1, or the row of the runner's feed buffer holding its id (a pending token, sampled on the
    # device by the previous step: asynchronous scheduling). None: no token is pending.
    token_sources: list[int] | None = None

    @classmethod
    def from_chunks(cls, chunks, feed_rows: dict | None = None) -> StepInput:
        """`feed_rows`: request id -> feed-buffer row of its pending token (the previous step's sampled rows)."""
        step = cls([], [], [], [], [], [], [])
        for chunk in chunks:
            # A request has at most one pending token, its last: only a chunk's last token can be one.
            if chunk.token_ids[-1] == PLACEHOLDER:
                if step.token_sources is None:
                    step.token_sources = [-1] * len(step.token_ids)
                step.token_sources += [-1] * (chunk.num_tokens - 1) + [feed_rows[chunk.request.request_id]]
            elif step.token_sources is not None:
                step.token_sources += [-1] * chunk.num_tokens
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

    @property
    def max_blocks(self) -> int:
        return max(len(b) for b in self.block_tables)


class StepBuffers:
    """Device buffers for steps of up to `num_tokens` tokens, `num_seqs` sequences and `num_rows` sampled rows.

    Args:
        one_token_dummies: pad with one-token dummy sequences (then a step fits only if it leaves as many
            padding tokens as padding sequences: decode steps into decode buffers); else the first dummy holds
            every padding token and the rest are empty.
        max_seqlen_q: fixed for a CUDA graph's buffers (1: the decode kernels; > 1: the prefill kernel);
            None: each `fill` sets it from the step (eager steps).
        feed: the runner's device buffer of the previous step's sampled tokens, which pending tokens read.
        reused: filled for many steps (a graph's buffers): on CUDA the pinned host staging is doubled.
    """

    def __init__(self, num_tokens: int, num_seqs: int, num_rows: int, max_blocks: int, device, *,
                 one_token_dummies: bool, max_seqlen_q: int | None = None, feed: torch.Tensor | None = None,
                 reused: bool = True):
        self.num_tokens, self.num_seqs, self.num_rows = num_tokens, num_seqs, num_rows
        self.one_token_dummies, self.static_max_seqlen_q = one_token_dummies, max_seqlen_q
        self.feed = feed  # the runner's buffer of the previous step's sampled tokens (pending tokens read it)
        t, s = num_tokens, num_seqs
        # token ids | positions | slots | sampled rows | token sources (-1, or a feed row for a pending token)
        self.ints64 = torch.zeros(4 * t + num_rows, dtype=torch.long, device=device)
        self.ints32 = torch.zeros(2 * s + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(s, max_blocks, dtype=torch.int32, device=device)
        # Host staging. On CUDA it is pinned, so the copies do not wait for the GPU (a copy from pageable memory
        # synchronizes the stream first), and doubled: a step may be filled while the previous step's copies
        # from the other half are still queued behind the GPU's work.
        pinned = torch.device(device).type == "cuda"
        self._staging = [(torch.zeros(4 * t + num_rows, dtype=torch.long, pin_memory=pinned),
                          torch.zeros(2 * s + 1, dtype=torch.int32, pin_memory=pinned),
                          torch.zeros(s * max_blocks, dtype=torch.int32, pin_memory=pinned))
                         for _ in range(2 if pinned and reused else 1)]
        self._fills = 0
        self.input_ids = torch.zeros(1, t, dtype=torch.long, device=device)
        self.positions = torch.zeros(1, t, dtype=torch.long, device=device)
        self.logits_indices = torch.zeros(num_rows, dtype=torch.long, device=device)
        self.metadata = AttentionMetadata(
            slot_mapping=self.ints64[2 * t:3 * t], block_tables=self.block_tables, seq_lens=self.ints32[:s],
            cu_seqlens_q=self.ints32[s:], max_seqlen_q=max_seqlen_q or 1,
        )

    def fits(self, step: StepInput) -> bool:
        return self.shape_fits(step, self.num_tokens, self.num_seqs, self.num_rows, self.one_token_dummies)

    @staticmethod
    def shape_fits(step: StepInput, num_tokens: int, num_seqs: int, num_rows: int, one_token_dummies: bool) -> bool:
        """Whether `step` fits buffers of this shape (see the class docstring's padding rules)."""
        t, s = len(step.token_ids), len(step.seq_lens)
        pad_t, pad_s = num_tokens - t, num_seqs - s
        if len(step.sample_rows) > num_rows or pad_t < 0 or pad_s < 0:
            return False
        if one_token_dummies:
            return pad_t == pad_s
        return pad_s > 0 or pad_t == 0  # padding tokens need a dummy sequence to hold them

    def scatter(self) -> None:
        """Staging buffer → the model's input tensors (three device copies; inside a step's CUDA graph)."""
        t, rows = self.num_tokens, self.num_rows
        ids = self.ints64[:t]
        if self.feed is not None:  # pending tokens: their ids come from the previous step's sampling
            sources = self.ints64[3 * t + rows:]
            ids = torch.where(sources >= 0, self.feed[sources.clamp(min=0)], ids)
        self.input_ids.view(-1).copy_(ids)
        self.positions.view(-1).copy_(self.ints64[t:2 * t])
        self.logits_indices.copy_(self.ints64[3 * t:3 * t + rows])

    def fill(self, step: StepInput) -> None:
        """Copy `step` (which `fits`) into the buffers, padded: three host→device copies. The model's inputs
        change only at the next `scatter()` (or the replay of a graph that recorded it)."""
        t, s = len(step.token_ids), len(step.seq_lens)
        pad_t, pad_s = self.num_tokens - t, self.num_seqs - s
        if self.one_token_dummies:
            dummy_lens = [1] * pad_s
        else:
            dummy_lens = ([pad_t] + [0] * (pad_s - 1)) if pad_s else []
        cu = [0]
        for n in step.query_lens + dummy_lens:
            cu.append(cu[-1] + n)
        rows = step.sample_rows or [0]
        rows = rows + rows[-1:] * (self.num_rows - len(rows))
        pad, no_source = [0] * pad_t, [-1] * pad_t
        if step.token_sources is not None and self.feed is None:
            raise ValueError("this step has pending tokens but its buffers have no feed buffer to read them from")
        sources = (step.token_sources or [-1] * t) + no_source
        ints64 = step.token_ids + pad + step.positions + pad + step.slots + no_source + rows + sources
        host64, host32, host_tables = self._staging[self._fills % len(self._staging)]
        self._fills += 1
        host64.copy_(torch.tensor(ints64, dtype=torch.long))
        host32.copy_(torch.tensor(step.seq_lens + dummy_lens + cu, dtype=torch.int32))
        # Block tables: only the columns some sequence uses now go over, as one compact [num_seqs, width] block;
        # the rest of the device table keeps stale entries, which (like stale entries past a row's blocks in the
        # compact block) are block ids that exist and are never read. Dummy rows are zeroed: a dummy token reads
        # block 0. One vectorised scatter: a numpy assignment per row costs ~3 µs, most of a 256-sequence decode
        # step's host time.
        lengths = np.fromiter(map(len, step.block_tables), dtype=np.int64, count=s)
        width = max(1, int(lengths.max(initial=0)))
        compact = host_tables[:self.num_seqs * width].view(self.num_seqs, width)
        tables = compact.numpy()
        flat = np.fromiter(itertools.chain.from_iterable(step.block_tables), dtype=np.int32, count=int(lengths.sum()))
        rows = np.repeat(np.arange(s), lengths)
        cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        tables[rows, cols] = flat
        tables[s:] = 0
        self.ints64.copy_(host64, non_blocking=True)
        self.ints32.copy_(host32, non_blocking=True)
        self.block_tables[:, :width].copy_(compact, non_blocking=True)
        if self.static_max_seqlen_q is None:
            self.metadata.max_seqlen_q = max(step.query_lens)

    @classmethod
    def for_step(cls, step: StepInput, device, min_batch: int, feed: torch.Tensor | None = None) -> StepBuffers:
        """Buffers sized to `step` alone (eager steps), padded to `min_batch` tokens with tokens of no sequence: they
        write no cache slot and no attention reads or computes for them (the attention kernels and their reference
        leave rows outside cu_seqlens_q's ranges alone), where a dummy sequence would cost a second attention per
        layer in a one-sequence decode step (the CPU's common case)."""
        pad = max(0, min_batch - len(step.token_ids))
        return cls(len(step.token_ids) + pad, len(step.seq_lens), max(min_batch, len(step.sample_rows)),
                   step.max_blocks, device, one_token_dummies=False, feed=feed, reused=False)
