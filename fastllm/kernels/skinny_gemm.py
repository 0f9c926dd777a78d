"""Skinny GEMM for decode: the linear layers of a batch-1..16 step, y = x @ weight^T + bias with M <= 16 rows.

    y[m, n] = sum_k x[m, k] * weight[n, k] + bias[n]        (fp32 accumulation, one rounding to x.dtype)

At decode a linear layer reads its whole weight once for a handful of rows of x: bytes of W are the whole cost
(Llama-2-7B: ~7 such GEMVs a layer, 13 GB a token). The kernels stream W once, with 16-byte loads, and keep
everything else small:
- `_skinny_gemm_kernel`: program (n block, k split) computes y[:, n block] for all M rows over its K range, in
  BLOCK_K chunks. W is read as [BLOCK_N, BLOCK_K] tiles contiguous along K; x (<= 16 x K) stays in L1/L2. For
  M <= 4 the product is a broadcast multiply and a sum over K in fp32 (a GEMV); for M in 5..16 it is `tl.dot` with
  x's rows padded to 16 (the MMA minimum), so a program can cover 64 rows of W without an M x N x K register tile.
- split-K: when N / BLOCK_N gives too few programs to fill the GPU, num_splits programs share each n block; each
  writes fp32 partials to a workspace [num_splits, M, N] and `_split_k_reduce_kernel` sums them in split order,
  adds the bias and rounds. The sum is deterministic (atomics would change the order run to run).
Rows past M and N are clamped to the last valid row on load and masked on store, so the W loads carry no mask
(except along K when K % BLOCK_K != 0) and stay vectorised.

CUDA-graph capture: the launch reads no device values and allocates nothing when `out` and `workspace` are given;
without `workspace`, split launches allocate theirs (the caching allocator's, or the graph pool's during capture).
"""

import math
import os

import torch

from fastllm.kernels._act_and_mul import gated_activation
from fastllm.kernels._registry import (
    check_float,
    check_out,
    check_same_device,
    device_guard,
    next_power_of_2,
    out_or_new,
    pdl_options,
    pdl_wait,
    register_out_op,
    rows_view,
    sm_count,
    tl,
    triton,
    use_triton,
)
from fastllm.kernels._tuning_cache import TuningCache
from fastllm.kernels.compile_ahead import launches_for_real
from fastllm.kernels.rms_norm import add_rms_norm_rows

# The last program of a linear with norm_after (kernels/linear_add_norm.py) holds rows of up to NORM_AFTER_WHOLE_ROW
# columns whole (one round trip to memory), longer ones NORM_AFTER_CHUNK columns at a time (two passes).
NORM_AFTER_WHOLE_ROW = 8192
NORM_AFTER_CHUNK = 1024


def _norm_after_chunk(n: int) -> dict:
    whole = next_power_of_2(n) <= NORM_AFTER_WHOLE_ROW
    return {"AFTER_CHUNK": next_power_of_2(n) if whole else NORM_AFTER_CHUNK, "AFTER_WHOLE_ROW": whole}


MAX_SKINNY_M = 16  # more rows go to cuBLAS (F.linear): past 16 a GEMM tile is no longer mostly padding

# Launch heuristic: deterministic, from M, N, K and the SM count (no autotuning by default: it would run inside
# graph capture). First choices, to be confirmed by the sweep of benchmarks/bench_gemv.py on an H100.
# Rows: (largest M, USE_DOT, BLOCK_N, BLOCK_K for 2-byte dtypes, num_warps, NUM_STAGES). BLOCK_M is M itself in the
# broadcast form and 16 in the dot form. Registers and shared memory: `ptxas -v`, sm_90, bf16, triton 3.9 (not 3.6).
_TILES = (
    # M = 1: the measured lead (H200: 3.35 TB/s vs cuBLAS 3.15 at 22016 x 4096) read 4 rows of W a program in
    # 512-1024-column chunks. Here 8 KB of W a chunk (one 16-byte load a thread a row at 4 warps), 2 chunks in
    # flight: 72 registers, 20 KB of shared memory, 7 programs an SM.
    (1, False, 4, 1024, 4, 3),
    # M = 2: 4 KB of W a chunk; x's two rows come through L1 (8-byte loads). 72 registers, 12 KB.
    (2, False, 4, 512, 4, 3),
    # M = 3..4: 8 rows of W so x's reloads are at most half the W bytes (and L1 hits); 4 fp32 accumulators of
    # 16 values a thread: 116 registers, 12 KB, 4 programs an SM.
    (4, False, 8, 256, 4, 3),
    # M = 5..16: x padded to 16 rows for tl.dot (mma m16n8k16); [64, 128] W tiles (16 KB bf16), 3 in flight:
    # 64 registers, 60 KB of shared memory, 3 programs an SM; x's reloads are a quarter of the W bytes.
    (16, True, 64, 128, 4, 4),
)
# Split K when the n blocks give fewer than _PROGRAMS_PER_SM programs an SM (264 on a 132-SM H100): fewer leave SMs
# idle. Each program keeps NUM_STAGES - 1 chunks of W in flight (16-48 KB), so 264 programs hold 4-12 MB, above the
# ~3 MB that an H100's bandwidth x latency (3.35 TB/s x ~0.8 us) needs. num_splits = floor(target / programs), so the
# grid stays within the target. Every split covers >= _MIN_SPLIT_COLUMNS of K, so its fp32 partials (written, then
# read back by the reduce kernel, mostly from L2) add at most M * 8 bytes per 1024 bytes of W: M / 128.
# More programs an SM (int4's decode GEMV gained 2.5% so in the step) measured no faster here (H200, 2026-12-02,
# replay A/B of the bf16 decode graph, W1-replay-ab-nvidia-h200-20261202-skinny-programs-*.json): 4 within 0.2% of 2
# on both shapes (4107 / 3744 us against 4099 / 3750), 8 slower (4407 / 3871); W1-fp8 370.0 / 352.4 tok/s against
# 371.4 (W1-fp8-nvidia-h200-20261202-skinny-programs.json).
_PROGRAMS_PER_SM = 2
# Measured slower, not kept: each program asking L2 (PTX prefetch.global.L2) for the start of its weight rows' K range
# before its PDL wait, while the kernel before it still runs. Replay of the bf16 Llama-3.1-8B decode graph on an H200
# (2026-12-02, one round, W1-replay-ab-nvidia-h200-20261202-l2-prefetch.json): 4066 / 4083 us without (two runs),
# 4170 us with 1 KB of each row, 4466 us with 8 KB.
_MIN_SPLIT_COLUMNS = 512
_MAX_SPLIT_K = 16
# Measured slower, not kept: a one-row grid a little over one wave of resident programs (N = 4096: 1024 programs of 4
# rows against 924 slots, 7 an SM, on an H200) taking 8 rows a program (512 programs, 512-column chunks), meant to
# end the GEMV without a tail of ~100 programs streaming alone. Decode graph replay, H200, 2026-12-02, three rounds
# (W1-replay-ab-nvidia-h200-20261202-decode-tails-*.json): Llama-2-7B 3716.0 us with a fourth chunk in flight, 3707.6
# without, against 3694.1; Llama-3.1-8B 4021.9 / 3993.7 against 4006.2.
_REDUCE_BLOCK = 1024

# Optional autotuning (FASTLLM_SKINNY_AUTOTUNE=1): the first eager CUDA call of a shape times every candidate below
# and keeps the fastest for that (M, N, K, dtype, device), in memory and on disk (kernels/_tuning_cache.py) for
# later processes on the same GPU model. Never during graph capture or a torch.compile trace, which use the tuned
# config if one exists (tuned settings on disk are used whether or not autotuning is on), else the heuristic.
# (BLOCK_N, BLOCK_K, num_warps, NUM_STAGES) per form:
AUTOTUNE = os.environ.get("FASTLLM_SKINNY_AUTOTUNE") == "1"
AUTOTUNE_TILES = {
    "broadcast": [(4, 1024, 4, 3), (4, 1024, 4, 2), (4, 512, 4, 3), (4, 512, 4, 4), (2, 1024, 4, 3), (8, 512, 4, 3),
                  (8, 256, 4, 3), (4, 2048, 8, 3), (16, 256, 8, 3)],
    "dot": [(64, 128, 4, 4), (64, 128, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 256, 4, 3), (128, 64, 4, 4),
            (128, 128, 8, 3)],
}  # fmt: skip
AUTOTUNE_SPLITS = (1, 2, 4, 8)
# Broadcast form: M accumulators of BLOCK_N x BLOCK_K fp32, at most this many values a thread (no spills).
_MAX_ACC_PER_THREAD = 64

_TUNED: dict[tuple, dict] = {}
_HEURISTIC: dict[tuple, dict] = {}
_ON_DISK = TuningCache("skinny_gemm")


@triton.jit
def _load_k(ptrs, k0, k, k_end, EVEN_K: tl.constexpr):
    """A tile whose last dim is K, at column k0 (masked past k_end unless EVEN_K)."""
    if EVEN_K:
        tile = tl.load(ptrs + k0)
    else:
        tile = tl.load(ptrs + k0, mask=k0 + k < k_end, other=0.0)
    return tile


@triton.jit
def _round_plus_residual(acc, R, rows, n, mask, stride_rm, Y_TY: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """acc (fp32, bias included) rounded to Y's dtype; with HAS_RESIDUAL, that plus R's rows, rounded again: the
    linear's output and then the residual add, each stored in the model's dtype as Hugging Face's eager forward
    stores them (bf16/fp16 parity)."""
    y = acc.to(Y_TY)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_rm + n[None, :], mask=mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(Y_TY)
    return y


@triton.jit
def _epilogue(acc, rows, n, pid_k, M, N, B, Y, P, WS, R, stride_ym, stride_rm, HAS_BIAS: tl.constexpr,
              SPLIT: tl.constexpr, HAS_WSCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Store acc [R, BLOCK_N] (fp32) for output rows `rows` [R] and columns n: fp32 partials of split pid_k (the
    reduce kernel finishes them), or y = acc + bias rounded once to Y's dtype (plus the residual R, rounded again,
    with HAS_RESIDUAL). With HAS_WSCALE (quantized weights) acc is first scaled by the weight's per-column scale
    WS[n]: a scale per output column distributes over the split-K sum."""
    mask = (rows < M)[:, None] & (n < N)[None, :]
    if HAS_WSCALE:
        acc = acc * tl.load(WS + n, mask=n < N, other=0.0)[None, :]
    if SPLIT:
        tl.store(P + (pid_k * M + rows)[:, None] * N + n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(B + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        y = _round_plus_residual(acc, R, rows, n, mask, stride_rm, Y.dtype.element_ty, HAS_RESIDUAL)
        tl.store(Y + rows[:, None] * stride_ym + n[None, :], y, mask=mask)


# What the kernel does to x as it loads it (PROLOGUE): nothing ("none"); RMSNorm ("rms_norm": x is the norm's input,
# the norm's weight and eps come with it); RMSNorm deferred ("rms_norm_deferred": the product reads x times the norm's
# weight, in fp32, and sums x^2 on the way; the rows' 1 / rms scales the finished product: no pass over the row before
# the loop, no split K); or a gated activation ("silu", "gelu", "gelu_tanh": x is [M, 2K] = [gate | up], the product
# reads act(gate) * up).
# "rms_scale_deferred": the deferred RMSNorm without its weight, which the caller folded into W's columns (W * w):
# the product reads x itself, so a chunk adds only x^2 to the plain GEMV's work.
PROLOGUES = ("none", "rms_norm", "rms_norm_deferred", "rms_scale_deferred", "silu", "gelu", "gelu_tanh")
DEFERRED_PROLOGUES = ("rms_norm_deferred", "rms_scale_deferred")
# Whether a launch with the deferred RMSNorm uses PDL where plain launches do (benchmarks compare both).
PDL_WITH_DEFERRED_NORM = True
# A gated activation's prologue (SiLU(gate) * up read by the down projection) launches without PDL (the bf16 step lost
# 6% with it, 2026-11-30: _registry's notes); benchmarks/bench_act_down.py measures it both ways.
GATED_PROLOGUES = ("silu", "gelu", "gelu_tanh")
PDL_WITH_GATED_PROLOGUE = False


@triton.jit
def _load_x_deferred(ptrs, k0, k, k_end, NW, norm_offset, EVEN_K: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """The deferred RMSNorm's view of x's tile at column k0: (x * (norm_offset + w), x^2), both fp32 (nothing rounded:
    the 1 / rms comes after the product); without HAS_WEIGHT (folded into W) x itself."""
    x = _load_k(ptrs, k0, k, k_end, EVEN_K).to(tl.float32)
    if HAS_WEIGHT:
        w = _load_k(NW + k, k0, k, k_end, EVEN_K).to(tl.float32)
        return x * (norm_offset + w), x * x
    return x, x * x


@triton.jit
def _load_x(ptrs, k0, k, k_end, K, NW, rstd, norm_offset, EVEN_K: tl.constexpr, PROLOGUE: tl.constexpr,
            NORM_CAST: tl.constexpr):
    """x's tile at column k0 in x's dtype, after the prologue: the values the unfused kernels would have stored.
    RMSNorm (rstd: the rows' 1 / rms, broadcast against the tile) as kernels/rms_norm.py rounds it: Llama's form
    rounds the normalised x and the weight to their dtypes before the product (NORM_CAST), Gemma's multiplies in
    fp32; either is rounded once to x's dtype. Gated activations: act(gate) * up in fp32, rounded once."""
    x = _load_k(ptrs, k0, k, k_end, EVEN_K)
    if PROLOGUE == "rms_norm":
        h = x.to(tl.float32) * rstd
        w = _load_k(NW + k, k0, k, k_end, EVEN_K).to(tl.float32)
        if NORM_CAST:
            w = (w + norm_offset).to(NW.dtype.element_ty).to(tl.float32)
            x = (w * h.to(x.dtype).to(tl.float32)).to(x.dtype)
        else:
            x = (h * (norm_offset + w)).to(x.dtype)
    elif PROLOGUE != "none":
        up = _load_k(ptrs + K, k0, k, k_end, EVEN_K).to(tl.float32)
        x = (gated_activation(x.to(tl.float32), PROLOGUE) * up).to(x.dtype)
    return x


@triton.jit
def _rows_rstd(X, rows, stride_xm, K, eps, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) over the K columns of X's rows `rows` [R], in fp32 (the RMSNorm prologue's first
    pass: the whole row is read once, from L2 after the first program, before the product starts)."""
    kk = tl.arange(0, BLOCK_K)
    ss = tl.zeros_like(rows).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        t = tl.load(X + rows[:, None] * stride_xm + (k0 + kk)[None, :], mask=(k0 + kk < K)[None, :], other=0.0)
        t = t.to(tl.float32)
        ss += tl.sum(t * t, axis=1)
    return tl.rsqrt(ss / K + eps)


@triton.jit
def _block_scales(WS, n, k0, N, stride_wsn, WS_BLOCK_N: tl.constexpr, WS_BLOCK_K: tl.constexpr):
    """The block scales of W's rows n [BLOCK_N] in the chunk starting at column k0, which lies in one block column
    (the launcher makes BLOCK_K divide WS_BLOCK_K): [BLOCK_N] fp32, rows past N clamped as W's are."""
    return tl.load(WS + (tl.minimum(n, N - 1) // WS_BLOCK_N) * stride_wsn + k0 // WS_BLOCK_K)


@triton.jit
def _pick(values, i: tl.constexpr, R: tl.constexpr):
    """values[i] of a [R] vector, as a scalar."""
    return tl.sum(tl.where(tl.arange(0, R) == i, values, 0.0), axis=0)


@triton.jit
def _skinny_gemm_kernel(
    X,  # [M, K], row stride stride_xm, unit column stride
    W,  # [N, K], row stride stride_wn, unit column stride; x's dtype, or float8 e4m3 with HAS_WSCALE
    B,  # [N] bias (read only with HAS_BIAS)
    Y,  # [M, N], row stride stride_ym (written without SPLIT)
    P,  # [num_splits, M, N] fp32 partials, contiguous (written with SPLIT)
    WS,  # fp32 weight scales: [N] per output channel (HAS_WSCALE), or [N / WS_BLOCK_N, K / WS_BLOCK_K] per block
    R,  # [M, N] residual added to the output (read only with HAS_RESIDUAL), row stride stride_rm
    NW,  # [K] the RMSNorm prologue's weight (read only with PROLOGUE "rms_norm")
    # NORM_AFTER (kernels/linear_add_norm.py): the residual [M, N] added to Y, the norm's weight [N], its output and
    # the sum [M, N], and an int32 counter, zero on entry and on exit
    AFTER_R, AFTER_W, AFTER_OUT, AFTER_S, COUNTER,
    M, N, K,
    stride_xm, stride_wn, stride_ym, stride_rm,
    stride_wsn,  # WS's row stride (block scales)
    stride_ar, stride_ao, stride_as,  # AFTER_R's, AFTER_OUT's and AFTER_S's row strides
    k_per_split,  # a multiple of BLOCK_K
    eps, norm_offset,  # the RMSNorm prologue's
    after_eps, after_offset,  # NORM_AFTER's norm
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_WSCALE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PROLOGUE: tl.constexpr,  # one of PROLOGUES
    NORM_CAST: tl.constexpr,
    USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # dot form: 16 (rows >= M clamped to M - 1); broadcast form: M itself, 1 to 4
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # K chunks in flight a program (tl.range pipelining through shared memory)
    USE_PDL: tl.constexpr = False,
    WS_BLOCK_N: tl.constexpr = 0,  # > 0: block-scaled weights (a block-wise FP8 checkpoint's), WS_BLOCK_K | BLOCK_K
    WS_BLOCK_K: tl.constexpr = 0,
    NORM_AFTER: tl.constexpr = False,  # without SPLIT: the last program adds AFTER_R to Y and RMS-normalises it
    AFTER_CAST: tl.constexpr = True,  # NORM_AFTER's cast_before_weight
    AFTER_CHUNK: tl.constexpr = 1024,  # NORM_AFTER's columns at a time
    AFTER_WHOLE_ROW: tl.constexpr = False,  # NORM_AFTER's row held whole (AFTER_CHUNK >= N)
):  # fmt: skip
    """Program (n block, split): y[m, n] = sum over k in the split's K range of x[m, k] * w[n, k], in fp32.

    Broadcast form: one [BLOCK_N, BLOCK_K] fp32 accumulator a row of x, summed over K once after the loop, so the
    loop body is loads and FMAs (no cross-thread reduction) and every tile keeps the 2-D layout whose shared-memory
    reads are 16 bytes wide (a [M, N, K] product tile would be read element by element)."""
    DEFERRED: tl.constexpr = PROLOGUE == "rms_norm_deferred" or PROLOGUE == "rms_scale_deferred"
    HAS_NW: tl.constexpr = PROLOGUE == "rms_norm_deferred"
    pdl_wait(USE_PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    # Rows past N (M) re-read row N - 1 (M - 1) and are never stored: no mask along N or M on the loads.
    w_ptrs = W + tl.minimum(n, N - 1).to(tl.int64)[:, None] * stride_wn + k[None, :]  # [BLOCK_N, BLOCK_K]
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if USE_DOT:
        m = tl.arange(0, BLOCK_M)
        x_ptrs = X + tl.minimum(m, M - 1)[:, None] * stride_xm + k[None, :]  # [BLOCK_M, BLOCK_K]
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
        if PROLOGUE == "rms_norm":
            rstd = _rows_rstd(X, tl.minimum(m, M - 1), stride_xm, K, eps, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        squares = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)  # the deferred RMSNorm's sums of x^2
        for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=NUM_STAGES):
            w = _load_k(w_ptrs, k0, k[None, :], k_end, EVEN_K)  # fp8 weights: widened
            if WS_BLOCK_K > 0:
                w = w.to(tl.float32) * _block_scales(WS, n, k0, N, stride_wsn, WS_BLOCK_N, WS_BLOCK_K)[:, None]
            w = w.to(X.dtype.element_ty)
            if DEFERRED:
                x, sq = _load_x_deferred(x_ptrs, k0, k[None, :], k_end, NW, norm_offset, EVEN_K, HAS_NW)
                squares += sq
                x = x.to(X.dtype.element_ty)
            else:
                x = _load_x(x_ptrs, k0, k[None, :], k_end, K, NW, rstd[:, None], norm_offset, EVEN_K, PROLOGUE,
                            NORM_CAST)
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        if DEFERRED:
            acc = acc * tl.rsqrt(tl.sum(squares, axis=1) / K + eps)[:, None]
        _epilogue(acc, m, n, pid_k, M, N, B, Y, P, WS, R, stride_ym, stride_rm, HAS_BIAS, SPLIT, HAS_WSCALE,
                  HAS_RESIDUAL)
    else:
        x_ptrs = X + k  # row r at + r * stride_xm
        # The rows' 1 / rms only for the norm prologue: the plain GEMV (every decode linear) computes nothing more
        rstd0 = 0.0
        rstd1 = 0.0
        rstd2 = 0.0
        rstd3 = 0.0
        if PROLOGUE == "rms_norm":
            X_ROWS: tl.constexpr = 1 if BLOCK_M == 1 else (2 if BLOCK_M == 2 else 4)  # x's rows, to a power of two
            rstd = _rows_rstd(X, tl.minimum(tl.arange(0, X_ROWS), M - 1), stride_xm, K, eps, BLOCK_K)
            rstd0 = _pick(rstd, 0, X_ROWS)
            rstd1 = _pick(rstd, 1 if X_ROWS > 1 else 0, X_ROWS)
            rstd2 = _pick(rstd, 2 if X_ROWS > 2 else 0, X_ROWS)
            rstd3 = _pick(rstd, 3 if X_ROWS > 3 else 0, X_ROWS)
        acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # rows >= BLOCK_M stay unused (compiled away)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        # The deferred RMSNorm's sums of x^2, one a row, over the K chunk's columns (summed after the loop)
        sq0 = tl.zeros([BLOCK_K], dtype=tl.float32)
        sq1 = tl.zeros([BLOCK_K], dtype=tl.float32)
        sq2 = tl.zeros([BLOCK_K], dtype=tl.float32)
        sq3 = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=NUM_STAGES):
            w = _load_k(w_ptrs, k0, k[None, :], k_end, EVEN_K).to(tl.float32)
            if WS_BLOCK_K > 0:
                w = w * _block_scales(WS, n, k0, N, stride_wsn, WS_BLOCK_N, WS_BLOCK_K)[:, None]
            if DEFERRED:
                x0, s0 = _load_x_deferred(x_ptrs, k0, k, k_end, NW, norm_offset, EVEN_K, HAS_NW)
                acc0 += w * x0[None, :]
                sq0 += s0
                if BLOCK_M > 1:
                    x1, s1 = _load_x_deferred(x_ptrs + 1 * stride_xm, k0, k, k_end, NW, norm_offset, EVEN_K,
                                              HAS_NW)
                    acc1 += w * x1[None, :]
                    sq1 += s1
                if BLOCK_M > 2:
                    x2, s2 = _load_x_deferred(x_ptrs + 2 * stride_xm, k0, k, k_end, NW, norm_offset, EVEN_K,
                                              HAS_NW)
                    acc2 += w * x2[None, :]
                    sq2 += s2
                if BLOCK_M > 3:
                    x3, s3 = _load_x_deferred(x_ptrs + 3 * stride_xm, k0, k, k_end, NW, norm_offset, EVEN_K,
                                              HAS_NW)
                    acc3 += w * x3[None, :]
                    sq3 += s3
            else:
                acc0 += w * _load_x(x_ptrs, k0, k, k_end, K, NW, rstd0, norm_offset, EVEN_K, PROLOGUE,
                                    NORM_CAST).to(tl.float32)[None, :]
                if BLOCK_M > 1:
                    acc1 += w * _load_x(x_ptrs + 1 * stride_xm, k0, k, k_end, K, NW, rstd1, norm_offset, EVEN_K,
                                        PROLOGUE, NORM_CAST).to(tl.float32)[None, :]
                if BLOCK_M > 2:
                    acc2 += w * _load_x(x_ptrs + 2 * stride_xm, k0, k, k_end, K, NW, rstd2, norm_offset, EVEN_K,
                                        PROLOGUE, NORM_CAST).to(tl.float32)[None, :]
                if BLOCK_M > 3:
                    acc3 += w * _load_x(x_ptrs + 3 * stride_xm, k0, k, k_end, K, NW, rstd3, norm_offset, EVEN_K,
                                        PROLOGUE, NORM_CAST).to(tl.float32)[None, :]
        y0 = tl.sum(acc0, axis=1)
        y1 = tl.sum(acc1, axis=1)
        y2 = tl.sum(acc2, axis=1)
        y3 = tl.sum(acc3, axis=1)
        if DEFERRED:
            y0 = y0 * tl.rsqrt(tl.sum(sq0, axis=0) / K + eps)
            y1 = y1 * tl.rsqrt(tl.sum(sq1, axis=0) / K + eps)
            y2 = y2 * tl.rsqrt(tl.sum(sq2, axis=0) / K + eps)
            y3 = y3 * tl.rsqrt(tl.sum(sq3, axis=0) / K + eps)
        row = tl.zeros([1], dtype=tl.int32)
        _epilogue(y0[None, :], row, n, pid_k, M, N, B, Y, P, WS, R, stride_ym, stride_rm,
                  HAS_BIAS, SPLIT, HAS_WSCALE, HAS_RESIDUAL)
        if BLOCK_M > 1:
            _epilogue(y1[None, :], row + 1, n, pid_k, M, N, B, Y, P, WS, R, stride_ym, stride_rm,
                      HAS_BIAS, SPLIT, HAS_WSCALE, HAS_RESIDUAL)
        if BLOCK_M > 2:
            _epilogue(y2[None, :], row + 2, n, pid_k, M, N, B, Y, P, WS, R, stride_ym, stride_rm,
                      HAS_BIAS, SPLIT, HAS_WSCALE, HAS_RESIDUAL)
        if BLOCK_M > 3:
            _epilogue(y3[None, :], row + 3, n, pid_k, M, N, B, Y, P, WS, R, stride_ym, stride_rm,
                      HAS_BIAS, SPLIT, HAS_WSCALE, HAS_RESIDUAL)
    if NORM_AFTER:
        # Every thread's stores of Y before the arrival (the barrier); the arrival's release/acquire makes them, and
        # the other programs' before theirs, visible to the last program, which then normalises the whole output:
        # the norm kernel's launch and its boundary in the graph are gone (as the decode attention merges its splits).
        tl.debug_barrier()
        arrived = tl.atomic_add(COUNTER, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(0) - 1:
            tl.store(COUNTER, 0)  # ready for the next launch (which kernel order puts after this one)
            add_rms_norm_rows(Y, AFTER_R, AFTER_W, AFTER_OUT, AFTER_S, M, stride_ym, stride_ar, stride_ao, stride_as,
                              N, after_eps, after_offset, AFTER_CAST, AFTER_CHUNK, AFTER_WHOLE_ROW)


@triton.jit
def _split_k_reduce_kernel(
    P, B, Y, R,  # as in _skinny_gemm_kernel
    M, N, stride_ym, stride_rm,
    num_splits,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
):  # fmt: skip
    """Program (m, n block): y[m, n] = sum_s P[s, m, n] (s = 0, 1, ... in order) + bias[n], rounded once (then plus
    the residual, rounded again, with HAS_RESIDUAL)."""
    pdl_wait(USE_PDL)
    m = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    reduce_split_row(P, B, Y, R, m, n, M, N, stride_ym, stride_rm, num_splits, HAS_BIAS, HAS_RESIDUAL, "")


@triton.jit
def sum_split_partials(P, m, n, M, N, num_splits, CACHE_MODIFIER: tl.constexpr):
    """Row m's partials at columns n (those < N; 0 elsewhere) summed in split order, in fp32: the one order every
    reduction of split-K partials uses (`reduce_split_row`, the int4 kernel's gated epilogue), so they agree."""
    mask = n < N
    acc = tl.zeros(n.shape, dtype=tl.float32)
    for s in range(0, num_splits):
        acc += tl.load(P + (s * M + m) * N + n, mask=mask, other=0.0, cache_modifier=CACHE_MODIFIER)
    return acc


@triton.jit
def reduce_split_row(P, B, Y, R, m, n, M, N, stride_ym, stride_rm, num_splits, HAS_BIAS: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, CACHE_MODIFIER: tl.constexpr):  # fmt: skip
    """Row m, columns n of the split-K result: the partials summed in split order, + bias, rounded once (+ the
    residual, rounded again). Shared by `_split_k_reduce_kernel` and the kernels that reduce their own splits
    (the last program of an n block; CACHE_MODIFIER ".cg": other SMs wrote the partials), so both give one result."""
    mask = n < N
    acc = sum_split_partials(P, m, n, M, N, num_splits, CACHE_MODIFIER)
    if HAS_BIAS:
        acc += tl.load(B + n, mask=mask, other=0.0).to(tl.float32)
    row = tl.zeros([1], dtype=tl.int32) + m
    y = _round_plus_residual(acc[None, :], R, row, n, mask[None, :], stride_rm, Y.dtype.element_ty, HAS_RESIDUAL)
    tl.store(Y + m * stride_ym + n[None, :], y, mask=mask[None, :])


def skinny_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch spec of `skinny_linear`: `torch.nn.functional.linear` (cuBLAS on CUDA)."""
    return torch.nn.functional.linear(x, weight, bias)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # host arithmetic without triton.cdiv: this also runs on CPU-only installs


def _tile(m: int, k: int, dtype: torch.dtype, block_n: int, block_k: int, num_warps: int, num_stages: int) -> dict:
    use_dot = m > 4
    if dtype == torch.float32:
        block_k //= 2  # the same bytes a chunk (fp32 only runs in tests)
    # Short rows: one chunk covers K; 16 is tl.dot's minimum.
    block_k = max(16, min(block_k, next_power_of_2(k)))
    return {"USE_DOT": use_dot, "BLOCK_M": 16 if use_dot else max(m, 1), "BLOCK_N": block_n, "BLOCK_K": block_k,
            "NUM_STAGES": num_stages, "num_warps": num_warps}  # fmt: skip


# A prologue (kernels/fused_linear.py: an RMSNorm or a gated activation applied to x as it is read) is computed by
# every program that reads x, once per BLOCK_N rows of W. Up to 4 rows of x, a prologue takes this many rows of W a
# program (BLOCK_K shrunk to keep a chunk's bytes). H200, 2026-11-30 (W5-fused-linear): a Llama-3.1-8B layer's decode
# GEMMs at 1 row took 136 / 122 / 132 / 183 us with 4 / 8 / 16 / 32 rows (unfused: 122); 2 rows not measured yet.
PROLOGUE_BLOCK_N = 8


def _heuristic(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, weight_bytes: int = 2,
               prologue: bool = False) -> dict:
    _, _, block_n, block_k, num_warps, num_stages = next(row for row in _TILES if m <= row[0])
    if prologue and m <= 4 and block_n < PROLOGUE_BLOCK_N:
        # The same bytes of W a chunk: one-byte weights (fp8/int8) keep twice the columns of two-byte ones
        block_k = max(16, block_k * block_n * (2 // weight_bytes) // PROLOGUE_BLOCK_N)
        block_n = PROLOGUE_BLOCK_N
        if m * block_n * block_k > _MAX_ACC_PER_THREAD * 32 * num_warps:  # M accumulators of BLOCK_N x BLOCK_K
            block_k = _MAX_ACC_PER_THREAD * 32 * num_warps // (m * block_n)
    elif weight_bytes == 1 and m * 2 * block_n * block_k <= _MAX_ACC_PER_THREAD * 32 * num_warps:
        # 1-byte (fp8/int8) weights: twice the rows of W a chunk keeps its bytes; measured on an H200 (W5-quant-gemv,
        # 2026-11-30) at M = 1: 3.3-3.7 TB/s with 8 rows of 1024 columns against 2.1-3.5 with 4.
        block_n *= 2
    cfg = _tile(m, k, dtype, block_n, block_k, num_warps, num_stages)
    cfg["split_k"] = _split_k(n, k, block_n, device)
    return cfg


def _split_k(n: int, k: int, block_n: int, device: torch.device) -> int:
    """K splits that bring the n blocks' programs up to _PROGRAMS_PER_SM an SM (see _TILES' comments)."""
    programs = max(1, _cdiv(n, block_n))
    return max(1, min(_PROGRAMS_PER_SM * sm_count(device) // programs, k // _MIN_SPLIT_COLUMNS, _MAX_SPLIT_K))


def _tune_key(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> tuple:
    return m, n, k, dtype, device


def _config(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, weight_bytes: int = 2,
            prologue: bool = False) -> dict:
    """Launch settings: the autotuned ones for this shape if any, else the heuristic's (cached: eager decode calls
    the launcher for every layer, and its host time is part of the step). `weight_bytes`: 1 for fp8/int8 weights
    (kernels/quant_linear.py), which have their own heuristic and are not autotuned; `prologue`: a fused_linear with
    a prologue (its own heuristic, not autotuned)."""
    if weight_bytes != 2 or prologue:
        key = (*_tune_key(m, n, k, dtype, device), weight_bytes, prologue)
        if key not in _HEURISTIC:
            _HEURISTIC[key] = _heuristic(m, n, k, dtype, device, weight_bytes, prologue)
        return dict(_HEURISTIC[key])
    key = _tune_key(m, n, k, dtype, device)
    cfg = _TUNED.get(key) or _HEURISTIC.get(key)
    if cfg is None:
        cfg = _tuned(m, n, k, dtype, device)
        if cfg is None:
            cfg = _HEURISTIC[key] = _heuristic(m, n, k, dtype, device)
    return dict(cfg)


def block_scaled_config(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device,
                        scale_block_k: int) -> dict:
    """Launch settings for one-byte weights with block scales whose blocks span `scale_block_k` columns: each K chunk
    must lie in one block column (its scales are then one per row of W), so BLOCK_K shrinks to divide the block and
    the broadcast form takes proportionally more rows of W a chunk (the same bytes, the same accumulators).
    H200, 2026-11-30 (W5-quant-gemv-*-blockfp8-*.json, 128 x 128 blocks, Llama-3.1-8B's four decode GEMMs at 1 row):
    97 us in all this way (32-77% of copy bandwidth; per-channel FP8 65 us, bf16 113), 108 us with the tl.dot form
    instead (better on down_proj, worse on gate_up)."""
    key = (*_tune_key(m, n, k, dtype, device), "blocks", scale_block_k)
    if key not in _HEURISTIC:
        cfg = _heuristic(m, n, k, dtype, device, weight_bytes=1)
        columns = min(cfg["BLOCK_K"], scale_block_k & -scale_block_k)  # the largest power of two dividing the block
        if columns < cfg["BLOCK_K"]:
            if not cfg["USE_DOT"]:
                cfg["BLOCK_N"] = cfg["BLOCK_N"] * cfg["BLOCK_K"] // columns
            cfg["BLOCK_K"] = columns
            cfg["split_k"] = _split_k(n, k, cfg["BLOCK_N"], device)
        _HEURISTIC[key] = cfg
    return dict(_HEURISTIC[key])


def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _disk_key(m: int, n: int, k: int, dtype: torch.dtype) -> str:
    return f"{m},{n},{k},{str(dtype).removeprefix('torch.')}"


def _tuned(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> dict | None:
    """This process's tuned settings for the shape, else a former process's (on disk, CUDA only), else None."""
    key = _tune_key(m, n, k, dtype, device)
    if key not in _TUNED and device.type == "cuda":
        cfg = _ON_DISK.get(_gpu_name(device), _disk_key(m, n, k, dtype))
        if cfg is not None:
            _TUNED[key] = cfg
    return _TUNED.get(key)


def _split(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(num_splits, k_per_split): K cut in split_k ranges of whole BLOCK_K chunks, none empty (so possibly fewer)."""
    num_chunks = max(1, _cdiv(k, block_k))
    chunks_per_split = _cdiv(num_chunks, split_k)
    return _cdiv(num_chunks, chunks_per_split), chunks_per_split * block_k


def _workspace(device: torch.device, numel: int) -> torch.Tensor:
    """An fp32 buffer for split-K partials, allocated per call: from the caching allocator (no cudaMalloc once warm)
    in eager calls, from the graph's pool during capture (the graph keeps it). Not cached in this module: a buffer
    held here would outlive every model that used it."""
    return torch.empty(numel, dtype=torch.float32, device=device)


def _launch(x, weight, bias, out, workspace, cfg, weight_scale=None, residual=None, prologue=None, norm=None,
            norm_after=None):
    # x: [M, K] ([M, 2K] for a gated-activation prologue), weight: [N, K], bias: [N] or None, out: [M, N] row views;
    # workspace: flat fp32 or None; weight_scale: for quantized (float8, int8) weights (kernels/quant_linear.py) [N]
    # fp32, or [N / bn, K / bk] fp32 block scales tiling W exactly (cfg from block_scaled_config), else None;
    # residual: [M, N] row view added to the output, or None; prologue: a PROLOGUES key, with
    # norm = (weight [K], eps, offset, cast_before_weight) for "rms_norm" (kernels/fused_linear.py); norm_after =
    # (residual [M, N], weight [N], out [M, N], sum [M, N], eps, offset, cast_before_weight, counter) for the last
    # program's add + RMSNorm of the output (kernels/linear_add_norm.py; no split K).
    m = x.shape[0]
    n, k = weight.shape
    if m == 0 or n == 0:
        return
    if k == 0:  # nothing to read (and an empty x may have no device pointer to pass): y = bias or 0
        out.copy_(skinny_linear_ref(x[:, :0], weight, bias) + (0 if residual is None else residual))
        return
    block_n, block_k = cfg["BLOCK_N"], cfg["BLOCK_K"]
    num_splits, k_per_split = _split(k, block_k, cfg["split_k"])
    split = num_splits > 1
    if split and workspace is None:
        workspace = _workspace(x.device, num_splits * m * n)
    parts = workspace if split else out  # not touched without a split
    b = bias if bias is not None else out  # never read without a bias
    r = residual if residual is not None else out  # never read without a residual
    norm_weight, eps, offset, cast = norm if norm is not None else (out, 0.0, 0.0, True)
    if norm_after is not None and split:
        raise ValueError("norm_after needs one K split (the last program normalises the finished output)")
    after_r, after_w, after_out, after_s, after_eps, after_offset, after_cast, counter = (
        norm_after if norm_after is not None else (out, out, out, out, 0.0, 0.0, True, out))
    blocks = weight_scale is not None and weight_scale.dim() == 2
    ws_block_n, ws_block_k = (n // weight_scale.shape[0], k // weight_scale.shape[1]) if blocks else (0, 0)
    if blocks and ws_block_k % block_k:
        raise ValueError(f"block-scaled weights need BLOCK_K ({block_k}) to divide the scale block's {ws_block_k} "
                         "columns: take the launch settings from block_scaled_config")
    # With a prologue PDL measured slower (see _registry); the deferred RMSNorm's launch is measured both ways
    pdl = pdl_options(x) if (prologue is None or (prologue in DEFERRED_PROLOGUES and PDL_WITH_DEFERRED_NORM)
                             or (prologue in GATED_PROLOGUES and PDL_WITH_GATED_PROLOGUE)) else {}
    if prologue in DEFERRED_PROLOGUES and split:
        raise ValueError("the deferred RMSNorm needs one K split (each program's sum of x^2 covers the whole row)")
    with device_guard(x):
        _skinny_gemm_kernel[(triton.cdiv(n, block_n), num_splits)](
            x, weight, b, out, parts, weight_scale if weight_scale is not None else out, r, norm_weight,
            after_r, after_w, after_out, after_s, counter,
            m, n, k, x.stride(0), weight.stride(0), out.stride(0), r.stride(0),
            weight_scale.stride(0) if blocks else 0, after_r.stride(0), after_out.stride(0), after_s.stride(0),
            k_per_split, eps, offset, after_eps, after_offset,
            HAS_BIAS=bias is not None, SPLIT=split, HAS_WSCALE=weight_scale is not None and not blocks,
            WS_BLOCK_N=ws_block_n, WS_BLOCK_K=ws_block_k,
            HAS_RESIDUAL=residual is not None, PROLOGUE=prologue or "none", NORM_CAST=cast,
            USE_DOT=cfg["USE_DOT"], EVEN_K=k % block_k == 0,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=cfg["NUM_STAGES"],
            NORM_AFTER=norm_after is not None, AFTER_CAST=after_cast, **_norm_after_chunk(n),
            num_warps=cfg["num_warps"], **pdl,
        )  # fmt: skip
        if split:
            _split_k_reduce_kernel[(m, triton.cdiv(n, _REDUCE_BLOCK))](
                parts, b, out, r, m, n, out.stride(0), r.stride(0), num_splits,
                HAS_BIAS=bias is not None, BLOCK_N=_REDUCE_BLOCK, HAS_RESIDUAL=residual is not None, num_warps=4,
                **pdl,
            )  # fmt: skip


@register_out_op("skinny_linear", mutates_args=("out", "workspace"))
def _skinny_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    workspace: torch.Tensor | None,
    split_k: int,
) -> None:
    """Op form on [M, K] rows: split_k is resolved by the launcher; workspace None uses the cached buffer."""
    m, k = x.shape
    if use_triton(x) and m <= MAX_SKINNY_M:
        cfg = _config(m, weight.shape[0], k, x.dtype, x.device)
        _launch(x, weight, bias, out, workspace, {**cfg, "split_k": split_k})
    else:
        out.copy_(skinny_linear_ref(x, weight, bias))


def _check_inputs(x, weight, bias) -> None:
    check_float("x", x)
    check_float("weight", weight)
    check_same_device("weight", weight, "x", x)
    if weight.ndim != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}, but x's last dim is {x.shape[-1]}: expected [N, {x.shape[-1]}]"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype}, expected x's dtype {x.dtype}")
    if bias is not None:
        check_float("bias", bias)
        check_same_device("bias", bias, "x", x)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype}, expected x's dtype {x.dtype}")


def _check_workspace(workspace: object, numel: int, device: torch.device) -> None:
    if not isinstance(workspace, torch.Tensor):
        raise TypeError(f"workspace must be a torch.Tensor, got {type(workspace).__name__}")
    if workspace.dtype != torch.float32 or not workspace.is_contiguous() or workspace.device != device:
        raise ValueError(f"workspace must be a contiguous float32 tensor on {device}, got {workspace.dtype} on "
                         f"{workspace.device}, contiguous={workspace.is_contiguous()}")  # fmt: skip
    if workspace.numel() < numel:
        raise ValueError(f"workspace has {workspace.numel()} elements; this call needs {numel} (splits x M x N)")


def workspace_numel(
    m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, split_k: int | None = None
) -> int:
    """fp32 elements of split-K workspace that `skinny_linear` needs for x [m, k] and weight [n, k] (0: no split)."""
    if m > MAX_SKINNY_M or m == 0:
        return 0
    cfg = _config(m, n, k, dtype, device)
    num_splits, _ = _split(k, cfg["BLOCK_K"], cfg["split_k"] if split_k is None else split_k)
    return num_splits * m * n if num_splits > 1 else 0


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for decode: the Triton skinny GEMM for M <= MAX_SKINNY_M rows, else cuBLAS.

    M = prod(x.shape[:-1]). With M > 16 or where the Triton kernels do not run (CPU tensors outside
    `triton_on_cpu()`), this is `F.linear` itself (copied into `out` when given).

    Args:
        x: [..., K], float32/float16/bfloat16, last dim contiguous.
        weight: [N, K] of x's dtype, last dim contiguous, on x's device.
        bias: optional [N] of x's dtype.
        out: optional [..., N] buffer of x's dtype, last dim contiguous.
        workspace: optional contiguous fp32 buffer of at least `workspace_numel(M, N, K, ...)` elements for the
            split-K partials; None uses a cached one per (device, size). Give one per stream for concurrent streams.
        split_k: number of K splits (>= 1; fewer if K has fewer BLOCK_K chunks); None picks it from the shapes.
    Returns:
        out, [..., N] in x's dtype.
    """
    _check_inputs(x, weight, bias)
    n, k = weight.shape
    m = math.prod(x.shape[:-1])
    shape = (*x.shape[:-1], n)
    if m > MAX_SKINNY_M or not use_triton(x):
        y = skinny_linear_ref(x, weight, bias)
        if out is None:
            return y
        check_out("out", out, shape, x.dtype, x.device)
        return out.copy_(y)
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be None or a positive int, got {split_k!r}")
    out = out_or_new("out", out, shape, x.dtype, x.device)
    if AUTOTUNE and x.is_cuda and m > 0 and n > 0:
        _maybe_autotune(x, weight, bias, m, n, k)
    cfg = _config(m, n, k, x.dtype, x.device)
    split_k = cfg["split_k"] if split_k is None else split_k
    if workspace is not None:
        num_splits, _ = _split(k, cfg["BLOCK_K"], split_k)
        _check_workspace(workspace, num_splits * m * n if num_splits > 1 else 0, x.device)
    _skinny_linear_op(rows_view("x", x), weight, bias, rows_view("out", out, writable=True), workspace, split_k)
    return out


def _candidates(m: int, k: int, dtype: torch.dtype) -> list[dict]:
    configs = []
    for block_n, block_k, num_warps, num_stages in AUTOTUNE_TILES["dot" if m > 4 else "broadcast"]:
        cfg = _tile(m, k, dtype, block_n, block_k, num_warps, num_stages)
        per_thread = cfg["BLOCK_M"] * block_n * cfg["BLOCK_K"] // (32 * num_warps)
        if not cfg["USE_DOT"] and per_thread > _MAX_ACC_PER_THREAD:
            continue
        for split_k in AUTOTUNE_SPLITS:
            if split_k == 1 or k // split_k >= _MIN_SPLIT_COLUMNS // 2:
                configs.append({**cfg, "split_k": split_k})
    return configs


def autotune(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> list[tuple[dict, float]]:
    """Time every autotune candidate on these (CUDA) inputs, keep the fastest for their shape; returns
    [(config, median ms)], fastest first. Must not be called during graph capture."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("skinny_linear autotuning launches and times kernels; it cannot run during graph capture")
    x2, out = rows_view("x", x), torch.empty(math.prod(x.shape[:-1]), weight.shape[0], dtype=x.dtype, device=x.device)
    (m, k), n = x2.shape, weight.shape[0]
    # Enough copies of W that the timed launches read it from HBM, as a decode step does, not from L2 (tens of MB).
    copies = [weight, *(weight.clone() for _ in range(_cdiv(_TIMING_WORKING_SET, weight.nbytes) - 1))]
    results = []
    for cfg in _candidates(m, k, x.dtype):
        num_splits, _ = _split(k, cfg["BLOCK_K"], cfg["split_k"])
        workspace = torch.empty(num_splits * m * n, dtype=torch.float32, device=x.device)
        ms = _graph_time_ms(lambda w, cfg=cfg, ws=workspace: _launch(x2, w, bias, out, ws, cfg), copies)
        results.append((cfg, ms))
    del copies
    results.sort(key=lambda item: item[1])
    _TUNED[_tune_key(m, n, k, x.dtype, x.device)] = results[0][0]
    _ON_DISK.put(_gpu_name(x.device), _disk_key(m, n, k, x.dtype), results[0][0])
    return results


# Candidates are timed inside a CUDA graph, as decode steps run them: launched eagerly, a GEMV of a few microseconds
# is timed at the host's launch rate instead (H200, 2026-11-30, W5-gemv: a 4096 x 4096 projection at 1 row measured
# 421 GB/s eager, 3112 in a graph), and every candidate ties. 256 MB of weight copies (5x an H100's L2) cycled
# through, each graph at least _TIMING_LAUNCHES launches, median of _TIMING_REPLAYS replays.
_TIMING_WORKING_SET = 256 << 20
_TIMING_LAUNCHES = 32
_TIMING_REPLAYS = 5


def _graph_time_ms(launch, weights: list[torch.Tensor]) -> float:
    """Median milliseconds of one `launch(w)`, replayed in a CUDA graph that launches it over `weights` in turn."""
    launch(weights[0])  # compiles outside the capture
    torch.cuda.synchronize()
    launches = weights * _cdiv(_TIMING_LAUNCHES, len(weights))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in launches:
            launch(w)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(_TIMING_REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(launches))
    del graph
    return sorted(times)[len(times) // 2]


def _maybe_autotune(x, weight, bias, m, n, k) -> None:
    if _tuned(m, n, k, x.dtype, x.device) is not None:
        return
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return  # the heuristic serves until an eager call tunes the shape
    with launches_for_real():  # timings of kernels that ran (not skipped by a start-up dry run)
        autotune(x, weight, bias)


__all__ = ["MAX_SKINNY_M", "autotune", "skinny_linear", "skinny_linear_ref", "workspace_numel"]
