"""Attention over the paged KV cache for flattened ragged batches (prefill, decode and mixed).

Sequence i owns queries q[cu_seqlens_q[i] : cu_seqlens_q[i+1]] (L_i tokens) and a context of n_i = seq_lens[i]
keys, its new tokens included (already written to the cache). Query j sits at position p = n_i - L_i + j; key
position k lives in block block_tables[i, k // block_size], row k % block_size. Query head h reads kv head
h // (Hq / Hkv) (MHA, GQA, MQA). Per query row and key k < n_i:

    s = scale * q . k_k
    s = c * tanh(s / c)                         (softcap c, Gemma-2)
    s = s + slope[h] * (k - p)                  (ALiBi: Bloom/MPT bias up to a per-row shift, which softmax drops)
    keep k if  k <= p (causal)  and  p - k < W (sliding window W, Mistral)
    out = softmax(s over kept k) @ v            (fp32 softmax, online as in flash-attention, in base 2)

Two kernels behind one launcher:
- `_prefill_kernel` (any batch, used when max_seqlen_q > 1): a varlen flash-attention. A program takes BLOCK_Q
  query tokens of one sequence times the GROUP query heads of one kv head, packed as the BLOCK_M rows of one tile
  (so K/V tiles are loaded once per kv head, and a decode row of a mixed batch still fills GROUP rows). It finds
  its sequence by a binary search over cu_seqlens_q on the device: the launcher never reads device values, so
  it can run inside CUDA-graph capture. Key tiles that every row sees in full skip the mask.
- `_decode_kernel` + `_combine_kernel` (max_seqlen_q == 1): flash-decoding. Each sequence's keys are cut into
  num_splits chunks handled by parallel programs (one per sequence, kv head and chunk, all GROUP query heads
  together); each writes its partial (max, sum, acc) and the combine kernel merges them. With one split the
  decode kernel writes the output directly. Given `split_counters` (zeroed int32, one per sequence and kv head: a
  runtime step passes its model's), the decode kernel merges them itself: each program counts its arrival with an
  atomic add, and the last of a (sequence, kv head) reads the others' partials and writes the output (and zeroes
  its counter again). That saves the combine kernel's launch, a few microseconds a layer that a batch-1 decode step
  with a short context otherwise spends mostly on the kernel boundary.
"""

import torch
import torch.nn.functional as F

from fastllm.kernels._registry import (
    FP8_KV_DTYPE,
    check_float,
    check_kv_scale,
    check_number,
    check_same_device,
    device_guard,
    next_power_of_2,
    out_or_new,
    pdl_options,
    pdl_wait,
    register_out_op,
    sm_count,
    tl,
    triton,
    use_triton,
)
from fastllm.kernels.kv_cache_write import (  # the cache writes' element rounding, rope, the rotary write's spec
    _to_cache,
    check_rotary_write_inputs,
    rope_tile,
    rotary_and_write_kv_ref,
)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
# Decode split heuristic (deterministic): aim for _PROGRAMS_PER_SM programs
# per SM (a 4-warp program with a 2-stage pipeline of 64-key bf16 K/V tiles holds 64 KB of shared memory, so 3
# fit on an H100 SM, and more programs keep more loads in flight), no split shorter than two 64-key tiles, and at
# most _MAX_SPLITS (the combine kernel holds every split's partial output of a head in registers).
_PROGRAMS_PER_SM = 4
_MIN_KEYS_PER_SPLIT = 128
_MAX_SPLITS = 64
# Keys a decode split takes at least, in BLOCK_N tiles, decided in the kernel from the real context length (the grid
# is fixed at capture for the longest context; the splits past the keys return at once). A context whose keys fit one
# split skips the merge (partials, arrival counter, the merge's loads): its program writes the output itself.
# Measured on an H200 (W1's batch-1 decode graph after a 256-token prompt, replay_ab.py, three alternating rounds):
# one tile a split is fastest; 2, 4 and 8 tiles (fewer programs, fewer or no merges) replayed 0.6/2.5/2.4% slower
# on Llama-2-7B and 0.7/3.1/2.6% on Llama-3.1-8B: at these contexts the split's serial tile loop costs more than the
# merge (W1-replay-ab-...-decode-min-tiles*).
_MIN_TILES_PER_SPLIT = 1
# Decode launch settings in place of _tile_sizes' choice where not None (benchmarks sweep them): the K/V tile length
# (64 keys in half precision), warps (4) and pipeline stages (2). Swept the same way (-decode-launch-*.json): 32- and
# 16-key tiles 0.5-0.8% and 2.0-2.6% slower, 2 warps 0.4-0.5% slower, 8 warps and 3 stages within 0.1% (no change).
# bench_attention --sweep on an H200 (2026-12-02, the kernel alone in a CUDA graph): the default within 0.9% of the
# best of 36 settings at W2's batch 512 x 192 keys, 3.7% at 256 x 256, 4.6% at batch 1 x 1024
# (W5-attention-nvidia-h200-20261202-serial-merge-sweep.json).
# After the keys came before the wait and rotary into the decode kernel (2026-12-02, replay_ab, three rounds:
# W1-replay-ab-nvidia-h200-20261202-decode-tails-*.json) 32-key tiles replayed W1's graph faster: Llama-2-7B 3648.5 us
# against 3694.1 (-1.2%), Llama-3.1-8B 3994.9 against 4006.2 (-0.3%): at W1's 128-384 keys twice the splits. Not the
# default: alone at batch 1 x 1024 keys they ran 9.28 us against 7.88 (the sweep above), so longer contexts lose what
# short ones gain; a tile chosen by the context at run time is what would take both. Measured no faster, removed:
# the run-time form that split contexts under 8 tiles in half tiles (32 keys of a 64-key tile, the second half masked),
# which replayed W1's graph in 3728.6 us against 3728.6 (Llama-2-7B) and 4038.5 against 4033.7 (Llama-3.1-8B), where
# 32-key tiles took 3693.2 / 4021.5 in the same call (H200, 2026-12-03, three rounds,
# W1-replay-ab-nvidia-h200-20261203-fine-splits-*.json): twice the splits is not what 32-key tiles gain by.
_DECODE_BLOCK_N = None
_DECODE_NUM_WARPS = None
_DECODE_NUM_STAGES = None
# Whether a decode program loads its split's first key tile (all but the new token's row) and the step's metadata
# before its PDL wait, while the kernel before it (the rotary and KV write) still runs, so that after the wait only q
# and the new token's row are read before the tile's math: True always, False never, None where the launch uses PDL.
# Why it is safe: _decode_kernel's comments. Measured on an H200 (2026-12-02, replay_ab.py of W1's bf16 decode graph
# after a 256-token prompt, three alternating rounds): Llama-2-7B 3756.1 us against 3766.5 with it off, Llama-3.1-8B
# 4073.6 against 4085.9 (-0.3% each, every round; W1-replay-ab-nvidia-h200-20261202-keys-before-wait-*.json): ~0.35
# us a layer, so the K/V loads were not what the kernel's ~6 us after the rotary kernel is mostly spent on.
_DECODE_KEYS_BEFORE_WAIT: bool | None = None
# Whether decode merges its splits inside the decode kernel where the caller passes split_counters (runtime steps
# do); False: the combine kernel always (benchmarks compare the two in one process). On an H200 (2026-12-02, batch 1
# in a CUDA graph, bench_attention) the merge taking 16 splits a load (_merge_splits) runs 1k / 4k / 32k contexts at
# 688 / 1949 / 3367 GB/s against the combine kernel's 687 / 1861 / 3497 (one split a load before: 529 / 955 / 2190);
# W1 Llama-3.1-8B 242.5 tok/s against 237.9 with the combine kernel in the same call
# (W5-attention-...-20261202-chunked-merge.json, W1-...-20261202-chunked-merge.json).
COMBINE_IN_DECODE_KERNEL = True
# Whether runtime decode steps run `decode_attention_with_rotary` (rotary, KV write and attention in one launch) in
# place of the rotary-and-write kernel then the decode kernel: True every decode step, False none, None (the default)
# the steps whose launches use PDL (at most 16 tokens on compute capability 9.0+: _registry.pdl_options), where it was
# measured. On an H200 (2026-12-02, replay_ab.py of W1's bf16 decode graph, three alternating rounds, with the decode
# kernel's keys loaded before its wait): Llama-2-7B 3721.2 us against 3750.9 unfused, Llama-3.1-8B 4033.3 against
# 4073.1 (-0.8% / -1.0%, every round: W1-replay-ab-nvidia-h200-20261202-rotary-in-decode-*.json). Before the keys
# came before the wait it measured no faster (2026-11-30, W1 in one call: 237.8 tok/s against 239.1 on the 8B shape,
# 259.6 against 258.8 on Llama-2-7B: W1-nvidia-h200-20261130-fused-rotary.json): with the rotary kernel gone, the
# decode kernel follows the QKV GEMM, whose tail is long enough to hide the key loads. Large decode batches (no PDL)
# keep the two kernels: not measured there. GPU tests: tests/test_kernel_decode_rotary.py.
FUSE_ROTARY_INTO_DECODE: bool | None = None


@triton.jit
def _tanh(x):
    # tanh from e = exp(-2|x|) <= 1: no overflow at large |x| (tl has no tanh in every Triton version we support).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _kv_offsets(bt_row, head_off, k_pos, k_valid, stride_cb, stride_cr, d, PAGE_SIZE: tl.constexpr):
    """Offsets [BLOCK_N, BLOCK_D] of the cache rows of key positions k_pos (through the block table; invalid
    positions read block 0, and their loads are masked)."""
    block = tl.load(bt_row + k_pos // PAGE_SIZE, mask=k_valid, other=0).to(tl.int64)
    return (block * stride_cb + (k_pos % PAGE_SIZE) * stride_cr + head_off)[:, None] + d[None, :]


@triton.jit
def _tile_scores(
    m_i, l_i, q, k, k_pos, k_valid, q_pos, slopes, qk_scale, softcap_log2, window,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_ALIBI: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax's first half for one key tile k [BLOCK_N, BLOCK_D] (q's dtype): the tile's probabilities p
    [M, BLOCK_N], the new row max, the old accumulators' rescale alpha and the new row sum."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [M, BLOCK_N] fp32
    if USE_SOFTCAP:
        s = softcap_log2 * _tanh(s * qk_scale)
    else:
        s = s * qk_scale
    if USE_ALIBI:
        s += slopes[:, None] * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
    keep = k_valid[None, :]
    if MASKED:
        if CAUSAL:
            keep = keep & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            keep = keep & (q_pos[:, None] - k_pos[None, :] < window)
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, m_new, alpha, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attend_tile(
    acc, m_i, l_i,  # running output [M, BLOCK_D] fp32, row max [M] (base 2), row sum [M]
    q,  # [M, BLOCK_D] in the model's dtype (the cache's, or bf16/fp16 over an FP8 cache)
    K_CACHE, V_CACHE,
    bt_row,  # pointer to this sequence's block-table row
    head_off,  # kv head * stride_ch
    k_start,  # first key position of the tile
    k_end,  # keys >= k_end are not loaded
    q_pos,  # [M] query positions
    slopes,  # [M] ALiBi slopes times log2(e) (unused without USE_ALIBI)
    qk_scale,  # scale * log2(e), or scale / softcap with USE_SOFTCAP
    softcap_log2,  # softcap * log2(e)
    window,
    stride_cb, stride_cr,
    d, d_mask,
    MASKED: tl.constexpr,  # apply the causal / window masks (tiles some rows see only in part)
    CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One BLOCK_N-key tile of online softmax: gather K/V rows through the block table, update (acc, m, l)."""
    k_pos = k_start + tl.arange(0, BLOCK_N)
    k_valid = k_pos < k_end
    kv_off = _kv_offsets(bt_row, head_off, k_pos, k_valid, stride_cb, stride_cr, d, PAGE_SIZE)
    kv_mask = k_valid[:, None] & d_mask[None, :]
    # An FP8 KV cache holds float8 e4m3: widened to q's dtype as it is read (a no-op for a cache of q's dtype).
    k = tl.load(K_CACHE + kv_off, mask=kv_mask, other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
    p, m_new, alpha, l_i = _tile_scores(m_i, l_i, q, k, k_pos, k_valid, q_pos, slopes, qk_scale, softcap_log2, window,
                                        MASKED, CAUSAL, USE_WINDOW, USE_ALIBI, USE_SOFTCAP, DOT_PRECISION)
    v = tl.load(V_CACHE + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# Triton compiles a variant per integer argument that is 1, divisible by 16, or neither. The number of sequences in a
# step changes every step, so a new variant could compile in the middle of serving (1.05 s on an H200, measured in
# W2's first run after its warm-up); it only bounds the grid's walk, where specializing gains nothing.
@triton.jit(do_not_specialize=["num_seqs"])
def _prefill_kernel(
    Q,  # [T, Hq, D], strides (stride_qt, stride_qh, 1)
    K_CACHE,  # [num_blocks, PAGE_SIZE, Hkv, D], strides (stride_cb, stride_cr, stride_ch, 1)
    V_CACHE,  # like K_CACHE (same strides)
    BLOCK_TABLES,  # [N, max_blocks] int32, row stride stride_bt
    SEQ_LENS,  # [N] int32
    CU_SEQLENS_Q,  # [N + 1] int32
    SLOPES,  # [Hq] fp32 (read only with USE_ALIBI)
    OUT,  # [T, Hq, D], strides (stride_ot, stride_oh, 1)
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_cb, stride_cr, stride_ch,
    stride_bt,
    num_seqs,
    head_dim,
    qk_scale,
    softcap_log2,
    window,
    v_scale,  # an FP8 KV cache's V multiplier (1.0 otherwise): applied once to the output
    GROUP: tl.constexpr,  # query heads per kv head
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # tile rows >= BLOCK_Q * GROUP: row r is token r // GROUP, head r % GROUP
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):  # fmt: skip
    """Program (b, kv head): query block b of the batch, counted as sequence i's blocks starting at
    cu_seqlens_q[i] // BLOCK_Q + i (an upper bound that needs no prefix sum); blocks past a sequence's queries exit.
    Programs run last block first, so the longest causal rows start earliest."""
    pdl_wait(USE_PDL)
    kvh = tl.program_id(1)
    b = tl.num_programs(0) - 1 - tl.program_id(0)
    # Binary search: the last sequence whose first block is <= b.
    lo = b * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        right = tl.load(CU_SEQLENS_Q + mid) // BLOCK_Q + mid <= b
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid - 1)
    seq = lo
    q_start = tl.load(CU_SEQLENS_Q + seq)
    q_len = tl.load(CU_SEQLENS_Q + seq + 1) - q_start
    q_block = b - (q_start // BLOCK_Q + seq)
    if (q_block < 0) | (q_block * BLOCK_Q >= q_len):
        return
    ctx = tl.load(SEQ_LENS + seq)

    r = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + r // GROUP
    head = kvh * GROUP + r % GROUP
    row_mask = (r < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = ctx - q_len + tok
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q_rows = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(Q + q_rows[:, None] + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    slopes = tl.zeros([BLOCK_M], tl.float32)
    if USE_ALIBI:
        slopes = tl.load(SLOPES + head, mask=row_mask, other=0.0) * 1.4426950408889634

    # Key range of the block: [k_lo, k_hi); keys in [full_lo, full_hi) are kept for every row of it.
    first_pos = ctx - q_len + q_block * BLOCK_Q
    last_pos = ctx - q_len + tl.minimum((q_block + 1) * BLOCK_Q, q_len) - 1
    k_lo = first_pos * 0
    full_lo = k_lo
    if USE_WINDOW:
        k_lo = tl.maximum(first_pos - window + 1, 0)
        full_lo = tl.maximum(last_pos - window + 1, 0)
    k_hi = ctx
    full_hi = ctx
    if CAUSAL:
        k_hi = last_pos + 1
        full_hi = first_pos + 1
    # Tiles are counted from k_lo: masked [0, t_a), whole [t_a, t_b), masked [t_b, num_tiles).
    num_tiles = tl.cdiv(k_hi - k_lo, BLOCK_N)
    t_a = tl.minimum(tl.cdiv(full_lo - k_lo, BLOCK_N), num_tiles)
    t_b = tl.maximum(t_a, (full_hi - k_lo) // BLOCK_N)

    bt_row = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
    head_off = kvh * stride_ch
    # Finite initial max: a row whose keys are all masked in a tile then gets exp2(-inf - m) = 0, not NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(0, t_a):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, K_CACHE, V_CACHE, bt_row, head_off, k_lo + t * BLOCK_N, k_hi, q_pos, slopes,
            qk_scale, softcap_log2, window, stride_cb, stride_cr, d, d_mask,
            True, CAUSAL, USE_WINDOW, USE_ALIBI, USE_SOFTCAP, BLOCK_N, PAGE_SIZE, DOT_PRECISION,
        )  # fmt: skip
    for t in range(t_a, t_b):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, K_CACHE, V_CACHE, bt_row, head_off, k_lo + t * BLOCK_N, k_hi, q_pos, slopes,
            qk_scale, softcap_log2, window, stride_cb, stride_cr, d, d_mask,
            False, CAUSAL, USE_WINDOW, USE_ALIBI, USE_SOFTCAP, BLOCK_N, PAGE_SIZE, DOT_PRECISION,
        )  # fmt: skip
    for t in range(t_b, num_tiles):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, K_CACHE, V_CACHE, bt_row, head_off, k_lo + t * BLOCK_N, k_hi, q_pos, slopes,
            qk_scale, softcap_log2, window, stride_cb, stride_cr, d, d_mask,
            True, CAUSAL, USE_WINDOW, USE_ALIBI, USE_SOFTCAP, BLOCK_N, PAGE_SIZE, DOT_PRECISION,
        )  # fmt: skip

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale  # x 1.0 is exact: other caches unchanged
    o_rows = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(OUT + o_rows[:, None] + d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])  # fmt: skip


@triton.jit(do_not_specialize=["num_splits"])  # it follows the context length (see _prefill_kernel)
def _decode_kernel(
    Q, K_CACHE, V_CACHE, BLOCK_TABLES, SEQ_LENS, CU_SEQLENS_Q, SLOPES, OUT,  # as in _prefill_kernel
    PART_ACC,  # [N, Hq, num_splits, D] fp32 (written with SPLIT)
    PART_M,  # [N, Hq, num_splits] fp32, running max in base 2
    PART_L,  # [N, Hq, num_splits] fp32, running sum
    COUNTERS,  # [>= N * Hkv] int32, zero on entry and on exit (read only with COMBINE)
    K_NEW, V_NEW,  # with ROTARY: this step's keys (before rotary) and values, [T, Hkv, D], unit last stride
    COS, SIN,  # with ROTARY: [T, R] angles (R = 2 * rot_half), row stride stride_ct
    SLOTS,  # with ROTARY: [T] cache slot of each token's K/V (< 0: padding, not written)
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_cb, stride_cr, stride_ch,
    stride_bt,
    stride_knt, stride_knh, stride_vnt, stride_vnh, stride_ct,
    rot_half,
    k_inv_scale, v_inv_scale,  # 1 / an FP8 cache's K and V multipliers, for the new token's write (else 1.0)
    num_q_heads,
    head_dim,
    qk_scale,
    softcap_log2,
    window,
    v_scale,  # an FP8 KV cache's V multiplier (1.0 otherwise): applied once to the output
    num_splits,  # a runtime value, so each split count does not compile a kernel of its own
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,  # GROUP padded to a power of 2 >= 16 (tl.dot's minimum)
    MERGE_G: tl.constexpr,  # with COMBINE: GROUP padded to a power of 2 (the merge's rows)
    MERGE_S: tl.constexpr,  # with COMBINE: splits the merge loads at once (_merge_tile)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    MIN_TILES: tl.constexpr,  # the fewest tiles a split takes (_MIN_TILES_PER_SPLIT)
    SPLIT: tl.constexpr,  # num_splits > 1: write partial results for _combine_kernel, else the output
    COMBINE: tl.constexpr,  # with SPLIT: the last program of a (sequence, kv head) merges the partials itself
    ROTARY: tl.constexpr,  # q arrives before rotary; the new token's rotated key and value are written here
    INTERLEAVED: tl.constexpr,  # with ROTARY: gptj pairs (else neox halves)
    USE_WINDOW: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KEYS_BEFORE_WAIT: tl.constexpr = False,  # the split's first key tile loaded before the PDL wait
    USE_PDL: tl.constexpr = False,
):  # fmt: skip
    """Program (seq, kv head, split): the GROUP query heads of the sequence's one query token against the split's
    chunk of keys. The key range [max(0, p - W + 1), p + 1) of the query at p = n - 1 needs no mask but its end,
    so the chunks cut exactly that range, in whole tiles.

    ROTARY (`decode_attention_with_rotary`): each program rotates its q heads as it loads them (rounded to q's dtype,
    as the rotary kernel's output is), and the program whose chunk ends at the new token (p, the last split with
    keys) first writes that token's rotated key and value to the cache, then, after a barrier of its threads, reads
    the cache as usual: no other program reads position p."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # Before the PDL wait (KEYS_BEFORE_WAIT), while the kernel right before this one may still run, it reads only what
    # that kernel cannot be writing: the step's metadata (written before the step's graph) and the keys and values of
    # positions before p (earlier steps'; the kernel before, or this one with ROTARY, writes position p, and q comes
    # after the wait). Every earlier kernel has completed by then: each calls pdl_wait (wait, then release its
    # successor) first, so this kernel starts only after the one before it passed its own wait. Every program still
    # waits before it returns, so the chain stays unbroken for the kernels after this one.
    q_start = tl.load(CU_SEQLENS_Q + seq)
    has_query = tl.load(CU_SEQLENS_Q + seq + 1) != q_start  # else padding of a graph batch: nothing to do
    ctx = tl.load(SEQ_LENS + seq)
    k_lo = ctx * 0
    if USE_WINDOW:
        k_lo = tl.maximum(ctx - window, 0)
    tiles = tl.cdiv(ctx - k_lo, BLOCK_N)
    tiles_per_split = tl.maximum(tl.cdiv(tiles, num_splits), MIN_TILES)
    k_begin = k_lo + split * tiles_per_split * BLOCK_N
    k_end = tl.minimum(k_begin + tiles_per_split * BLOCK_N, ctx)
    # Splits that hold keys (the rest of a short context's grid holds none): at least split 0, which writes even
    # an empty context's output. Merged in this kernel, the others have nothing to write and are not counted.
    splits_with_keys = tl.maximum(tl.cdiv(tiles, tl.maximum(tiles_per_split, 1)), 1)

    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    bt_row = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
    head_off = kvh * stride_ch
    if KEYS_BEFORE_WAIT:
        # The split's first tile without position p, and where p's row lives (its block is an earlier step's).
        # (Scalar conditions fold into bounds: the interpreter's `&` of a mask and a scalar bool is no mask.)
        first_pos = k_begin + tl.arange(0, BLOCK_N)
        first_old = first_pos < tl.where(has_query, tl.minimum(k_end, ctx - 1), 0)
        first_off = _kv_offsets(bt_row, head_off, first_pos, first_old, stride_cb, stride_cr, d, PAGE_SIZE)
        first_mask = first_old[:, None] & d_mask[None, :]
        first_k = tl.load(K_CACHE + first_off, mask=first_mask, other=0.0)
        first_v = tl.load(V_CACHE + first_off, mask=first_mask, other=0.0)
        p_in_first = has_query & (ctx > 0) & (k_begin < k_end) & (ctx - 1 < k_begin + BLOCK_N)
        p_mask = d < tl.where(p_in_first, head_dim, 0)
        p_block = tl.load(bt_row + (ctx - 1) // PAGE_SIZE + d * 0, mask=p_mask, other=0).to(tl.int64)
        p_off = p_block * stride_cb + ((ctx - 1) % PAGE_SIZE) * stride_cr + head_off + d
    pdl_wait(USE_PDL)
    if not has_query:
        return
    if COMBINE and split >= splits_with_keys:
        return

    g = tl.arange(0, BLOCK_G)
    g_mask = g < GROUP
    head = kvh * GROUP + g
    q_rows = q_start.to(tl.int64) * stride_qt + head * stride_qh
    if ROTARY:
        cs_row = q_start.to(tl.int64) * stride_ct
        q = rope_tile(Q, q_rows, d, g_mask[:, None] & d_mask[None, :], COS, SIN, cs_row, rot_half, INTERLEAVED)
        q = q.to(Q.dtype.element_ty)
        slot = tl.load(SLOTS + q_start).to(tl.int64)
        if split == splits_with_keys - 1 and slot >= 0:  # the chunk that holds position p: its writer
            one = tl.zeros([1], tl.int64)
            kv_mask = (one == 0)[:, None] & d_mask[None, :]
            key = rope_tile(K_NEW, one + q_start.to(tl.int64) * stride_knt + kvh * stride_knh, d, kv_mask, COS, SIN,
                            cs_row, rot_half, INTERLEAVED)  # fmt: skip
            value = tl.load(V_NEW + q_start.to(tl.int64) * stride_vnt + kvh * stride_vnh + d, mask=d_mask)
            row = (slot // PAGE_SIZE) * stride_cb + (slot % PAGE_SIZE) * stride_cr + kvh * stride_ch
            tl.store(K_CACHE + row + one[:, None] + d[None, :], _to_cache(key, K_CACHE, k_inv_scale), mask=kv_mask)
            tl.store(V_CACHE + row + d, _to_cache(value, V_CACHE, v_inv_scale), mask=d_mask)
            tl.debug_barrier()  # the stores of all this program's threads before any of them reads the cache
    else:
        q = tl.load(Q + q_rows[:, None] + d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = tl.zeros([BLOCK_G], tl.int32) + ctx - 1
    slopes = tl.zeros([BLOCK_G], tl.float32)
    if USE_ALIBI:
        slopes = tl.load(SLOPES + head, mask=g_mask, other=0.0) * 1.4426950408889634

    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_next = k_begin
    if KEYS_BEFORE_WAIT:
        # Position p's key and value (written by the kernel before, or above with ROTARY) join the loaded tile.
        at_p = (first_pos == ctx - 1)[:, None]
        p_key = tl.load(K_CACHE + p_off, mask=p_mask, other=0.0).to(q.dtype)
        p_value = tl.load(V_CACHE + p_off, mask=p_mask, other=0.0).to(q.dtype)
        first_k = tl.where(at_p, p_key[None, :], first_k.to(q.dtype))
        first_v = tl.where(at_p, p_value[None, :], first_v.to(q.dtype))
        p, m_i, alpha, l_i = _tile_scores(m_i, l_i, q, first_k, first_pos, first_pos < k_end, q_pos, slopes,
                                          qk_scale, softcap_log2, window, False, False, False, USE_ALIBI,
                                          USE_SOFTCAP, DOT_PRECISION)  # fmt: skip
        acc = tl.dot(p.to(first_v.dtype), first_v, input_precision=DOT_PRECISION)  # acc was 0: no rescale
        k_next = k_begin + BLOCK_N
    for k_start in range(k_next, k_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, K_CACHE, V_CACHE, bt_row, head_off, k_start, k_end, q_pos, slopes,
            qk_scale, softcap_log2, window, stride_cb, stride_cr, d, d_mask,
            False, False, False, USE_ALIBI, USE_SOFTCAP, BLOCK_N, PAGE_SIZE, DOT_PRECISION,
        )  # fmt: skip

    mask = g_mask[:, None] & d_mask[None, :]
    o_rows = q_start.to(tl.int64) * stride_ot + head * stride_oh
    if SPLIT and COMBINE:
        # A context whose keys all fell to split 0 needs no merge: its program writes the output itself.
        if splits_with_keys == 1:
            _store_decode_output(OUT, o_rows, d, acc, l_i, v_scale, mask)
        else:
            part = (seq.to(tl.int64) * num_q_heads + head) * num_splits + split  # [BLOCK_G]
            _store_partials(PART_ACC, PART_M, PART_L, part, head_dim, d, acc * v_scale, m_i, l_i, g_mask, mask)
            # Every thread's partial stores come before the arrival (the barrier), and the arrival's release/acquire
            # makes them, and the other programs' before theirs, visible to the last one to arrive.
            tl.debug_barrier()
            counter = COUNTERS + seq * (num_q_heads // GROUP) + kvh
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == splits_with_keys - 1:
                tl.store(counter, 0)  # ready for the next launch (which kernel order puts after this one)
                _merge_splits(PART_ACC, PART_M, PART_L, OUT, seq, kvh, q_start, num_q_heads, num_splits,
                              splits_with_keys, head_dim, stride_ot, stride_oh, GROUP, MERGE_G, MERGE_S, BLOCK_D)
    elif SPLIT:
        part = (seq.to(tl.int64) * num_q_heads + head) * num_splits + split  # [BLOCK_G]
        _store_partials(PART_ACC, PART_M, PART_L, part, head_dim, d, acc * v_scale, m_i, l_i, g_mask, mask)
    else:
        _store_decode_output(OUT, o_rows, d, acc, l_i, v_scale, mask)


@triton.jit
def _store_decode_output(OUT, o_rows, d, acc, l_i, v_scale, mask):
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale  # x 1.0 is exact: other caches unchanged
    tl.store(OUT + o_rows[:, None] + d[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _store_partials(PART_ACC, PART_M, PART_L, part, head_dim, d, acc, m_i, l_i, g_mask, mask):
    tl.store(PART_ACC + part[:, None] * head_dim + d[None, :], acc, mask=mask)
    tl.store(PART_M + part, m_i, mask=g_mask)
    tl.store(PART_L + part, l_i, mask=g_mask)


@triton.jit
def _merge_splits(PART_ACC, PART_M, PART_L, OUT, seq, kvh, q_start, num_q_heads, num_splits, num_parts, head_dim,
                  stride_ot, stride_oh, GROUP: tl.constexpr, MERGE_G: tl.constexpr, MERGE_S: tl.constexpr,
                  BLOCK_D: tl.constexpr):  # fmt: skip
    """Write the decode output of kv head kvh's query heads from their first num_parts partials (split s of head h at
    row (seq * num_q_heads + h) * num_splits + s of PART_*): sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s,
    M = max_s m_s, taken MERGE_S splits a load with the running max rescaled as flash attention does. Loads bypass
    L1 (.cg): other SMs wrote the partials.

    Why MERGE_S at once: a loop of one split an iteration waits on each of its loads in turn (two a split, the max
    first); at 32 splits of a 4k context that added ~9 us to a batch-1 decode launch on an H200 (2026-12-02,
    bench_attention: 955 GB/s merged here against 1871 with the combine kernel, which loads all splits at once)."""
    g = tl.arange(0, MERGE_G)
    g_mask = g < GROUP
    head = kvh * GROUP + g
    first = (seq.to(tl.int64) * num_q_heads + head) * num_splits  # [MERGE_G]
    s = tl.arange(0, MERGE_S)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    m_run = tl.full([MERGE_G], -1.0e30, tl.float32)
    denom = tl.zeros([MERGE_G], tl.float32)
    acc = tl.zeros([MERGE_G, BLOCK_D], tl.float32)
    for s0 in range(0, num_parts, MERGE_S):
        rows = first[:, None] + s0 + s[None, :]  # [MERGE_G, MERGE_S]
        rows_mask = g_mask[:, None] & (s0 + s < num_parts)[None, :]
        m = tl.load(PART_M + rows, mask=rows_mask, other=-1.0e30, cache_modifier=".cg")
        l_s = tl.load(PART_L + rows, mask=rows_mask, other=0.0, cache_modifier=".cg")
        part_acc = tl.load(PART_ACC + rows[:, :, None] * head_dim + d[None, None, :],
                           mask=rows_mask[:, :, None] & d_mask[None, None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m, axis=1))
        alpha = tl.exp2(m_run - m_new)
        w = tl.exp2(m - m_new[:, None])  # masked splits: l and acc 0, so no weight reaches the sums
        denom = denom * alpha + tl.sum(w * l_s, axis=1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * part_acc, axis=1)
        m_run = m_new
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    o_rows = q_start.to(tl.int64) * stride_ot + head * stride_oh
    tl.store(OUT + o_rows[:, None] + d[None, :], out.to(OUT.dtype.element_ty),
             mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _combine_kernel(
    CU_SEQLENS_Q, OUT, PART_ACC, PART_M, PART_L,
    stride_ot, stride_oh,
    num_q_heads,
    head_dim,
    num_splits,
    BLOCK_S: tl.constexpr,  # num_splits padded to a power of 2
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):  # fmt: skip
    """Program (seq, q head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s."""
    pdl_wait(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(CU_SEQLENS_Q + seq)
    if tl.load(CU_SEQLENS_Q + seq + 1) == q_start:
        return
    s = tl.arange(0, BLOCK_S)
    s_mask = s < num_splits
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    part = (seq.to(tl.int64) * num_q_heads + head) * num_splits + s
    m = tl.load(PART_M + part, mask=s_mask, other=-1.0e30)
    l_s = tl.load(PART_L + part, mask=s_mask, other=0.0)
    acc = tl.load(PART_ACC + part[:, None] * head_dim + d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    denom = tl.sum(w * l_s, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0, denom, 1.0)
    o_off = q_start.to(tl.int64) * stride_ot + head * stride_oh
    tl.store(OUT + o_off + d, out.to(OUT.dtype.element_ty), mask=d_mask)


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache[blocks]; a float8 cache (FP8 KV) is gathered as its bytes (torch's CPU indexing has no float8 kernel)."""
    if cache.dtype == FP8_KV_DTYPE:
        return cache.view(torch.uint8)[blocks].view(FP8_KV_DTYPE)
    return cache[blocks]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    *,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Plain-PyTorch spec of `paged_attention` (and the CPU path): per sequence, gather its K/V through the block
    table and attend in fp32 with explicit masks (SDPA's own causal one for a whole prompt). Tokens outside
    cu_seqlens_q's ranges get zeros. `v_scale` (an FP8 cache's V multiplier) scales each output once, in fp32.

    Without soft-capping the attention itself is torch's SDPA (fp32, grouped-query heads, the masks and ALiBi as
    its mask): on the CPU it is the engine's decode path, where SDPA's kernel took 0.04 ms a layer against
    2 ms for the written-out einsum/softmax (SmolLM2-135M, 2 cores). Soft-capping needs the scores themselves."""
    _, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    slopes = None if alibi_slopes is None else alibi_slopes.float()
    if not softcap and all(b - a <= 1 for a, b in zip(cu, cu[1:])):  # a decode step: one batched attention
        return _decode_ref(q, k_cache, v_cache, block_tables, seq_lens, cu, lens, scale, sliding_window, slopes,
                           v_scale)
    # One sequence holding every query token: its attention is the output, nothing to scatter.
    whole = len(lens) == 1 and cu == [0, q.shape[0]]
    out = None if whole else torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for i, ctx in enumerate(lens):
        q_len = cu[i + 1] - cu[i]
        if q_len == 0:
            continue
        blocks = block_tables[i, : -(-ctx // page_size)].long()
        k = _gather(k_cache, blocks).reshape(-1, num_kv_heads, head_dim)[:ctx].float()  # [ctx, Hkv, D]
        v = _gather(v_cache, blocks).reshape(-1, num_kv_heads, head_dim)[:ctx].float()
        qi = q[cu[i] : cu[i + 1]].float()  # [L, Hq, D]
        windowed = sliding_window is not None and ctx > sliding_window
        if not softcap and slopes is None and not windowed and causal and q_len == ctx > 1:
            # A whole causal sequence (a first prefill step): SDPA's own causal mask, under which its fused CPU kernel
            # skips the key tiles above the diagonal (half the work; on the CPU the same bits as the explicit mask).
            o = F.scaled_dot_product_attention(qi.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None], is_causal=True, scale=scale,
                                               enable_gqa=group > 1)[0].transpose(0, 1)  # [L, Hq, D]
        else:
            o = _attend(qi, k, v, scale, group, softcap, slopes,
                        _visible_keys(q_len, ctx, causal and q_len > 1, sliding_window if windowed else None,
                                      q.device))
        if v_scale != 1.0:
            o = o * v_scale
        if whole:
            return o.to(q.dtype).contiguous()
        out[cu[i] : cu[i + 1]] = o.to(q.dtype)
    return out if out is not None else torch.zeros(q.shape, dtype=q.dtype, device=q.device)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, group: int, softcap: float | None,
            slopes: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor:
    """One sequence's attention in fp32: q [L, Hq, D] over its context's k, v [ctx, Hkv, D], the queries being the
    context's last L positions; `keep` [L, ctx] the keys each sees (None: all) -> [L, Hq, D]."""
    q_len, num_q_heads, head_dim = q.shape
    ctx, num_kv_heads = k.shape[0], k.shape[1]
    rel = None  # [L, ctx]: k_pos - q_pos, for ALiBi
    if slopes is not None:
        rel = (torch.arange(ctx, device=q.device)[None, :]
               - torch.arange(ctx - q_len, ctx, device=q.device)[:, None])
    if softcap:  # soft-capping needs the scores themselves
        qg = q.view(q_len, num_kv_heads, group, head_dim)
        s = torch.einsum("qhgd,khd->hgqk", qg, k) * scale  # [Hkv, G, L, ctx]
        s = softcap * torch.tanh(s / softcap)
        if slopes is not None:
            s = s + slopes.view(num_kv_heads, group, 1, 1) * rel
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        return torch.einsum("hgqk,khd->qhgd", torch.softmax(s, dim=-1), v).reshape(q_len, num_q_heads, head_dim)
    mask = keep
    if slopes is not None:  # ALiBi as an additive mask: slope[h] * (k_pos - q_pos), -inf where not kept
        mask = slopes.view(num_q_heads, 1, 1) * rel
        if keep is not None:
            mask = mask.masked_fill(~keep, float("-inf"))
    return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          attn_mask=mask, scale=scale, enable_gqa=group > 1)[0].transpose(0, 1)


def _visible_keys(q_len: int, ctx: int, causal: bool, window: int | None, device: torch.device) -> torch.Tensor | None:
    """[q_len, ctx] bool: the keys each of the context's last q_len positions sees (causal: up to its own position;
    window: its last `window` keys), None where every query sees every key. Made as a band of a ones matrix: no
    [q_len, ctx] int64 positions (128 MB for a 2048-token step at 8k context, built again by every layer)."""
    if not causal and window is None:
        return None
    offset = ctx - q_len  # query i sits at position offset + i
    keep = torch.ones(q_len, ctx, dtype=torch.bool, device=device)
    if causal:
        keep = keep.tril(offset)  # key j <= offset + i
    if window is not None:
        keep = keep.triu(offset - window + 1)  # key j > offset + i - window
    return keep


def _decode_ref(q, k_cache, v_cache, block_tables, seq_lens, cu: list[int], lens: list[int], scale: float,
                sliding_window: int | None, slopes: torch.Tensor | None, v_scale: float = 1.0) -> torch.Tensor:
    """`paged_attention_ref` for a step whose sequences query at most one token each: every sequence's K/V gathered
    at once (padded to the longest context, masked past each one's length) and one SDPA call for the batch, where
    a loop would call it once per sequence (the CPU's decode steps)."""
    _, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    rows = [i for i in range(len(lens)) if cu[i + 1] > cu[i]]  # sequences with a query (dummies may have none)
    if not rows:
        return out
    if len(rows) == 1 and sliding_window is None and slopes is None:  # one sequence sees all its keys: no mask,
        i, token = rows[0], cu[rows[0]]                              # no index tensors (a CPU decode step)
        blocks = block_tables[i, : -(-lens[i] // page_size)].long()
        k = _gather(k_cache, blocks).flatten(0, 1)[: lens[i]].float().transpose(0, 1)  # [Hkv, ctx, D]
        v = _gather(v_cache, blocks).flatten(0, 1)[: lens[i]].float().transpose(0, 1)
        o = F.scaled_dot_product_attention(q[token : token + 1].float().transpose(0, 1), k, v, scale=scale,
                                           enable_gqa=num_q_heads != num_kv_heads)  # [Hq, 1, D]
        out[token] = (o[:, 0] * v_scale if v_scale != 1.0 else o[:, 0]).to(q.dtype)
        return out
    seqs = torch.tensor(rows, device=q.device)
    tokens = torch.tensor([cu[i] for i in rows], device=q.device)
    ctx = max(lens[i] for i in rows)
    length = seq_lens.index_select(0, seqs).long()[:, None]  # [N, 1]
    blocks = block_tables.index_select(0, seqs)[:, : -(-ctx // page_size)].long()  # [N, nb]
    pos = torch.arange(ctx, device=q.device)[None, :]  # [1, ctx]
    if any(lens[i] < ctx for i in rows):
        # Entries past a sequence's own blocks may hold anything (never read): block 0 stands in, masked below.
        blocks = blocks.where(torch.arange(blocks.shape[1], device=q.device)[None, :] * page_size < length, 0)
    k = _gather(k_cache, blocks).flatten(1, 2)[:, :ctx].float()  # [N, ctx, Hkv, D]
    v = _gather(v_cache, blocks).flatten(1, 2)[:, :ctx].float()
    # No mask where every key is seen (one sequence, no window): SDPA then takes its fused kernel, not the masked
    # math path (1.5x slower for a SmolLM2 layer on the CPU).
    mask = None
    if any(lens[i] < ctx for i in rows) or (sliding_window is not None and ctx > sliding_window):
        keep = pos < length  # [N, ctx]
        if sliding_window is not None:
            keep &= (length - 1 - pos) < sliding_window
        mask = keep[:, None, None, :]  # [N, 1, 1, ctx]
    if slopes is not None:  # ALiBi: slope[h] * (k_pos - q_pos), the query at position length - 1
        bias = slopes.view(1, num_q_heads, 1, 1) * (pos - (length - 1))[:, None, None, :]
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    o = F.scaled_dot_product_attention(q.index_select(0, tokens).float()[:, :, None, :], k.transpose(1, 2),
                                       v.transpose(1, 2), attn_mask=mask, scale=scale,
                                       enable_gqa=num_q_heads != num_kv_heads)  # [N, Hq, 1, D]
    o = o[:, :, 0, :] * v_scale if v_scale != 1.0 else o[:, :, 0, :]
    out.index_copy_(0, tokens, o.to(q.dtype))
    return out


def default_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Decode splits per sequence from shapes alone (graph capture forbids reading seq_lens): enough programs
    (seqs x kv heads x splits) for _PROGRAMS_PER_SM per SM, no split under _MIN_KEYS_PER_SPLIT keys of the
    longest context the block table can hold, at most _MAX_SPLITS."""
    # Host arithmetic only (no triton.cdiv: this also runs on CPU-only installs without triton).
    want = -(-_PROGRAMS_PER_SM * sm_count(device) // max(1, num_seqs * num_kv_heads))
    return max(1, min(want, -(-max_context // _MIN_KEYS_PER_SPLIT), _MAX_SPLITS))


# Elements of the split partials the in-kernel merge holds at once ([MERGE_G, MERGE_S, BLOCK_D] fp32: 64 registers a
# thread at the decode kernel's 4 warps): 16 splits a load at Llama's 4 query heads a kv head and head size 128.
_MERGE_TILE_ELEMENTS = 8192


def _merge_tile(group: int, block_d: int) -> dict:
    """The in-kernel merge's tile (`_merge_splits`): query heads padded to a power of 2, and the splits a load
    (independent of the split count, which is a runtime value: no kernel compiled per count)."""
    merge_g = next_power_of_2(group)
    return {"MERGE_G": merge_g, "MERGE_S": max(1, min(_MAX_SPLITS, _MERGE_TILE_ELEMENTS // (merge_g * block_d)))}


def _tile_sizes(head_dim: int, dtype: torch.dtype, group: int) -> dict:
    """Deterministic launch settings (no autotuning: it would run inside graph capture).

    Prefill: 128 x 64 tiles and 8 warps for half precision up to D=128 (the Triton flash-attention tutorial's H100
    choice); D=256 and fp32 (whose ieee dot holds fp32 tiles) halve both tiles to stay within shared memory.
    """
    block_d = max(16, next_power_of_2(head_dim))
    big = dtype == torch.float32 or block_d > 128
    block_m = max(64 if big else 128, next_power_of_2(group))
    return {
        "block_d": block_d,
        "prefill": {"BLOCK_M": block_m, "BLOCK_Q": block_m // group, "BLOCK_N": 32 if big else 64,
                    "num_warps": 4 if big else 8, "num_stages": 2},
        "decode": {"BLOCK_G": max(16, next_power_of_2(group)), **_merge_tile(group, block_d),
                   "BLOCK_N": 16 if dtype == torch.float32 and block_d > 128 else 32 if big else _DECODE_BLOCK_N or 64,
                   "num_warps": 4, "num_stages": 2},
    }  # fmt: skip


def _launch(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, alibi_slopes, out,
            max_seqlen_q, scale, causal, sliding_window, softcap, num_splits, v_scale=1.0,
            split_counters=None, rotary=None):  # fmt: skip
    """rotary (decode only): (k, v, cos, sin, slot_mapping, interleaved, k_scale) of `decode_attention_with_rotary`,
    q then being the queries before rotary (the new V is stored divided by v_scale, the multiplier attention
    applies)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if num_tokens == 0 or num_seqs == 0:
        return
    cfg = _tile_sizes(head_dim, q.dtype, group)
    use_softcap = softcap > 0
    qk_scale = scale / softcap if use_softcap else scale * LOG2E
    common = dict(
        USE_WINDOW=sliding_window > 0, USE_ALIBI=alibi_slopes is not None, USE_SOFTCAP=use_softcap,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PAGE_SIZE=page_size, BLOCK_D=cfg["block_d"],
        **pdl_options(q),
    )  # fmt: skip
    slopes = alibi_slopes if alibi_slopes is not None else q  # never read without USE_ALIBI
    strides = (
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
    )  # fmt: skip
    with device_guard(q):
        if max_seqlen_q > 1:
            p = cfg["prefill"]
            grid = (triton.cdiv(num_tokens, p["BLOCK_Q"]) + num_seqs, num_kv_heads)
            _prefill_kernel[grid](
                q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, slopes, out, *strides,
                num_seqs, head_dim, qk_scale, softcap * LOG2E, sliding_window, v_scale,
                GROUP=group, CAUSAL=causal, **common, **p,
            )  # fmt: skip
            return
        d = dict(cfg["decode"])
        if _DECODE_NUM_WARPS is not None:
            d["num_warps"] = _DECODE_NUM_WARPS
        if _DECODE_NUM_STAGES is not None:
            d["num_stages"] = _DECODE_NUM_STAGES
        if num_splits > 1:
            part_acc = torch.empty((num_seqs, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
            part_m = torch.empty((num_seqs, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
            part_l = torch.empty_like(part_m)
        else:
            part_acc = part_m = part_l = out  # not touched with one split
        combine = num_splits > 1 and split_counters is not None and COMBINE_IN_DECODE_KERNEL
        if rotary is None:
            new_kv = (q, q, q, q, seq_lens)  # never read without ROTARY
            new_strides, rot_half, interleaved, inv_scales = (0, 0, 0, 0, 0), 0, False, (1.0, 1.0)
        else:
            k_new, v_new, cos, sin, slots, interleaved, k_scale = rotary
            new_kv = (k_new, v_new, cos, sin, slots)
            new_strides = (k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), cos.stride(0))
            rot_half, inv_scales = cos.shape[1] // 2, (1.0 / k_scale, 1.0 / v_scale)
        keys_before_wait = _DECODE_KEYS_BEFORE_WAIT
        if keys_before_wait is None:
            keys_before_wait = common.get("USE_PDL", False)
        _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
            q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, slopes, out, part_acc, part_m, part_l,
            split_counters if combine else seq_lens, *new_kv,
            *strides, *new_strides, rot_half, *inv_scales,
            num_q_heads, head_dim, qk_scale, softcap * LOG2E, sliding_window, v_scale, num_splits,
            GROUP=group, SPLIT=num_splits > 1, COMBINE=combine, ROTARY=rotary is not None, INTERLEAVED=interleaved,
            MIN_TILES=_MIN_TILES_PER_SPLIT, KEYS_BEFORE_WAIT=keys_before_wait, **common, **d,
        )  # fmt: skip
        if num_splits > 1 and not combine:
            _combine_kernel[(num_seqs, num_q_heads)](
                cu_seqlens_q, out, part_acc, part_m, part_l, out.stride(0), out.stride(1), num_q_heads, head_dim,
                num_splits, BLOCK_S=next_power_of_2(num_splits), BLOCK_D=cfg["block_d"], num_warps=4,
                **pdl_options(q),
            )  # fmt: skip


@register_out_op("paged_attention", mutates_args=("out", "split_counters"))
def _paged_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    alibi_slopes: torch.Tensor | None,
    out: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    causal: bool,
    sliding_window: int,
    softcap: float,
    num_splits: int,
    v_scale: float,
    split_counters: torch.Tensor | None,
) -> None:
    """Op form: sliding_window 0 and softcap 0.0 mean none; num_splits is resolved by the launcher."""
    if use_triton(q):
        _launch(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, alibi_slopes, out,
                max_seqlen_q, scale, causal, sliding_window, softcap, num_splits, v_scale,
                split_counters)  # fmt: skip
    else:
        out.copy_(paged_attention_ref(
            q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale=scale, causal=causal,
            sliding_window=sliding_window or None, alibi_slopes=alibi_slopes, softcap=softcap or None,
            v_scale=v_scale,
        ))  # fmt: skip


def _check_int_tensor(name: str, t: object, ndim: int, ref: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    check_same_device(name, t, "q", ref)
    if t.numel() > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tuple(t.stride())}")


def _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, sliding_window,
                  alibi_slopes, softcap, num_splits) -> None:  # fmt: skip
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if name == "q" or not (isinstance(t, torch.Tensor) and t.dtype == FP8_KV_DTYPE):  # FP8 caches: below
            check_float(name, t)
        check_same_device(name, t, "q", q)
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must share strides, got {k_cache.stride()} and {v_cache.stride()}")
    num_q_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"q's head_dim {head_dim} does not match the cache's head_dim {k_cache.shape[3]}")
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"q's {num_q_heads} heads are not a multiple of the cache's {num_kv_heads} kv heads")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in (q.dtype, FP8_KV_DTYPE):
            raise TypeError(f"{name} has dtype {t.dtype}, expected q's dtype {q.dtype} or {FP8_KV_DTYPE} (FP8 KV "
                            "cache)")
    _check_int_tensor("block_tables", block_tables, 2, q)
    _check_int_tensor("seq_lens", seq_lens, 1, q)
    _check_int_tensor("cu_seqlens_q", cu_seqlens_q, 1, q)
    num_seqs = seq_lens.shape[0]
    if block_tables.shape[0] != num_seqs or cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)}, seq_lens {tuple(seq_lens.shape)} and cu_seqlens_q "
            f"{tuple(cu_seqlens_q.shape)} must describe one batch: [N, max_blocks], [N] and [N + 1]"
        )
    # A SymInt passes too (a dynamo-traced caller with dynamic shapes); a tensor would need a host read.
    if isinstance(max_seqlen_q, bool) or not isinstance(max_seqlen_q, (int, torch.SymInt)) or max_seqlen_q < 1:
        raise ValueError(f"max_seqlen_q must be a positive Python int, got {max_seqlen_q!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or positive, got {softcap!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or a positive int, got {num_splits!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
            raise TypeError("alibi_slopes must be a float32 tensor")
        check_same_device("alibi_slopes", alibi_slopes, "q", q)
        if alibi_slopes.shape != (num_q_heads,) or (num_q_heads > 1 and alibi_slopes.stride(0) != 1):
            raise ValueError(f"alibi_slopes must be contiguous of shape ({num_q_heads},), "
                             f"got {tuple(alibi_slopes.shape)}")  # fmt: skip


def _check_split_counters(split_counters, seq_lens, k_cache, q) -> None:
    _check_int_tensor("split_counters", split_counters, 1, q)
    if split_counters.numel() < seq_lens.shape[0] * k_cache.shape[2]:
        raise ValueError(f"split_counters has {split_counters.numel()} entries; this batch needs at least "
                         f"{seq_lens.shape[0] * k_cache.shape[2]} (sequences x kv heads)")


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    *,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    v_scale: float = 1.0,
    split_counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of a flattened ragged batch of queries over the paged KV cache; see the module docstring.

    Never reads device values on the host, so it can be captured in a CUDA graph (shapes fix the launch).

    Args:
        q: [T, Hq, D], last dim contiguous; the queries of N sequences concatenated. D <= 256.
        k_cache, v_cache: [num_blocks, block_size, Hkv, D] of q's dtype or float8 e4m3 (an FP8 KV cache), one
            layout; Hq % Hkv == 0.
        block_tables: [N, max_blocks] int32; entries past a sequence's blocks are never read.
        seq_lens: [N] int32, each sequence's context length including its new query tokens.
        cu_seqlens_q: [N + 1] int32, query offsets of the sequences in q (cu_seqlens_q[0] == 0).
        max_seqlen_q: Python int >= every query length; 1 selects the split-K decode kernels.
        scale: factor on q . k (usually D ** -0.5).
        causal: mask keys after each query's position.
        sliding_window: None, or W: keep keys with q_pos - k_pos < W.
        alibi_slopes: None, or [Hq] float32: add slope[h] * (k_pos - q_pos) to the scores.
        softcap: None, or c: scores become c * tanh(scores / c) (after scale, before ALiBi and masks).
        num_splits: decode splits per sequence; None picks `default_num_splits` from the shapes.
        out: optional [T, Hq, D] buffer of q's dtype, last dim contiguous.
        v_scale: an FP8 KV cache's multiplier of its V values (V = stored x v_scale; finite, > 0; 1.0 for any other
            cache). K's multiplier is the caller's to fold into `scale`.
        split_counters: None (split decode merges its partials in the combine kernel), or an int32 tensor of at
            least N x Hkv zeros on q's device that calls never share concurrently: the decode kernel merges the
            splits itself and leaves the counters zero again.
    Returns:
        out, [T, Hq, D] in q's dtype (rows of tokens outside cu_seqlens_q's ranges are left as they are).
    """
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, sliding_window,
                  alibi_slopes, softcap, num_splits)  # fmt: skip
    check_kv_scale("v_scale", v_scale, v_cache)
    check_number("scale", scale, positive=True)
    if split_counters is not None:
        _check_split_counters(split_counters, seq_lens, k_cache, q)
    if out is None and not use_triton(q):  # the CPU path: the reference itself, no buffer nor op dispatch
        return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q,
                                   scale=scale, causal=causal, sliding_window=sliding_window,
                                   alibi_slopes=alibi_slopes, softcap=softcap, v_scale=v_scale)
    out = out_or_new("out", out, q.shape, q.dtype, q.device)
    if num_splits is None:
        max_context = block_tables.shape[1] * k_cache.shape[1]
        num_splits = default_num_splits(seq_lens.shape[0], k_cache.shape[2], max_context, q.device)
    _paged_attention_op(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, alibi_slopes, out, max_seqlen_q,
        float(scale), bool(causal), int(sliding_window or 0), float(softcap or 0.0), int(num_splits), float(v_scale),
        split_counters,
    )  # fmt: skip
    return out


def decode_attention_with_rotary_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, seq_lens,
                                     cu_seqlens_q, *, scale, interleaved=False, k_scale=1.0, v_scale=1.0,
                                     sliding_window=None, alibi_slopes=None, softcap=None) -> torch.Tensor:  # fmt: skip
    """`decode_attention_with_rotary`'s spec: `rotary_and_write_kv_ref`, then `paged_attention_ref` of the rotated q
    over the cache (one query token a sequence)."""
    q_rot = rotary_and_write_kv_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, interleaved=interleaved,
                                    k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    return paged_attention_ref(q_rot, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, 1, scale=scale,
                               sliding_window=sliding_window, alibi_slopes=alibi_slopes, softcap=softcap,
                               v_scale=v_scale)  # fmt: skip


@register_out_op("decode_attention_with_rotary", mutates_args=("k_cache", "v_cache", "out", "split_counters"))
def _decode_attention_with_rotary_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    alibi_slopes: torch.Tensor | None,
    out: torch.Tensor,
    scale: float,
    interleaved: bool,
    k_scale: float,
    v_scale: float,
    sliding_window: int,
    softcap: float,
    num_splits: int,
    split_counters: torch.Tensor | None,
) -> None:
    """Op form: sliding_window 0 and softcap 0.0 mean none."""
    if use_triton(q):
        _launch(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, alibi_slopes, out, 1, scale, True,
                sliding_window, softcap, num_splits, v_scale, split_counters,
                rotary=(k, v, cos, sin, slot_mapping, interleaved, k_scale))  # fmt: skip
    else:
        out.copy_(decode_attention_with_rotary_ref(
            q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, seq_lens, cu_seqlens_q, scale=scale,
            interleaved=interleaved, k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window or None,
            alibi_slopes=alibi_slopes, softcap=softcap or None,
        ))  # fmt: skip


def decode_attention_with_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    scale: float,
    interleaved: bool = False,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    split_counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """A decode step's attention with its rotary and KV-cache write in the same launch: `rotary_and_write_kv` of
    this step's q, k, v (one token a sequence), then `paged_attention` of the rotated q with max_seqlen_q = 1. The
    decode kernel rotates q as it loads it and writes each sequence's new key and value itself (the program that
    reads the new position writes it first), so the step runs one kernel (with the splits merged in it: one launch)
    where it ran two or three.

    Args:
        q: [T, Hq, D] before rotary; k, v: [T, Hkv, D]; cos, sin: [T, R] (q's dtype); slot_mapping: [T], as for
            `rotary_and_write_kv` (its interleaved, k_scale, v_scale too; `scale` has K's multiplier folded in,
            as for `paged_attention`, which takes v_scale as well).
        block_tables, seq_lens, cu_seqlens_q, sliding_window, alibi_slopes, softcap, num_splits, out,
            split_counters: as for `paged_attention`; every sequence has at most one query token.
    Returns:
        out, [T, Hq, D] in q's dtype. k_cache and v_cache hold the new tokens' rotated keys and values.
    """
    check_rotary_write_inputs(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if cos.dtype != q.dtype:
        raise TypeError(f"cos and sin must have q's dtype {q.dtype} here (the rotated q stays in it), got {cos.dtype}")
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, 1, sliding_window, alibi_slopes,
                  softcap, num_splits)  # fmt: skip
    check_number("scale", scale, positive=True)
    if split_counters is not None:
        _check_split_counters(split_counters, seq_lens, k_cache, q)
    if out is None and not use_triton(q):
        return decode_attention_with_rotary_ref(
            q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, seq_lens, cu_seqlens_q, scale=scale,
            interleaved=interleaved, k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window,
            alibi_slopes=alibi_slopes, softcap=softcap,
        )  # fmt: skip
    out = out_or_new("out", out, q.shape, q.dtype, q.device)
    if num_splits is None:
        max_context = block_tables.shape[1] * k_cache.shape[1]
        num_splits = default_num_splits(seq_lens.shape[0], k_cache.shape[2], max_context, q.device)
    _decode_attention_with_rotary_op(
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping, block_tables, seq_lens, cu_seqlens_q, alibi_slopes, out,
        float(scale), bool(interleaved), float(k_scale), float(v_scale), int(sliding_window or 0),
        float(softcap or 0.0), int(num_splits), split_counters,
    )  # fmt: skip
    return out


__all__ = ["decode_attention_with_rotary", "decode_attention_with_rotary_ref", "default_num_splits",
           "paged_attention", "paged_attention_ref"]
