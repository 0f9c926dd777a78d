"""Quantized linears: y = x @ W^T + b with W stored quantized (formats in `fastllm/quant/`).

- `fp8_linear`: FP8 weights (e4m3, one scale per output channel, quantized once; or a block-wise FP8 checkpoint's
  scale per block of bn x bk, read by the skinny GEMM up to 16 rows). Steps of up to 16 rows (decode)
  keep the activations in the model's dtype and read the FP8 weights in the skinny GEMM (the weight's bytes are the
  cost there); larger ones quantize x per token (row) on the fly (one Triton kernel, `quantize_rows_fp8`) and run
  cuBLAS's FP8 tensor-core GEMM (`torch._scaled_mm`, row-wise scales: the fp32 accumulator times x_scale[m] *
  w_scale[n]). Shapes that GEMM does not take (K or N not a multiple of 16) and CPU tensors run the reference.
- `int8_linear`, `int4_linear`: weight-only. Up to 16 rows (decode) a Triton kernel reads the quantized weights: the
  skinny GEMM for int8 (as for fp8); for int4 `_int4_gemv_kernel`, which reads the packed weight once for all rows
  (grid: blocks of outputs x K splits) in chunks of one group. More rows on CUDA: int8 dequantizes the weight into x's
  dtype on each call for cuBLAS; int4 runs `_int4_gemm_kernel`, which dequantizes W's tiles in its K loop (H200, 2048
  rows: 2.0-2.2x cuBLAS bf16's time, where dequantizing the whole weight each call took 4x; 128 rows: 1.5-2.4x, was
  22-29x). The references dequantize and multiply in fp32.

The references define the math the GPU paths are checked against (by SQNR: the GPU accumulates in another order).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastllm.kernels import skinny_gemm
from fastllm.kernels._act_and_mul import gated_activation
from fastllm.kernels._registry import (
    device_guard,
    fp8_row_codes,
    pdl_options,
    pdl_wait,
    row_launch_settings,
    sm_count,
    tl,
    triton,
    use_triton,
)
from fastllm.kernels.fp8_block_dequantize import dequantize_blocks_kernel
from fastllm.kernels.skinny_gemm import (  # the skinny GEMM's store (partials, or + bias rounded once) and reduce
    _epilogue,
    reduce_split_row,
    sum_split_partials,
)
from fastllm.quant import fp8 as fp8_format
from fastllm.quant.int_weight import dequantize_int4, dequantize_int8


@triton.jit
def _quantize_rows_fp8_kernel(X, Q, S, stride_x, stride_q, K, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """One program a row: its largest magnitude, the scale mapping it to FP8_MAX, the row divided by it (IEEE
    division, as the reference divides) and rounded to e4m3 (to nearest even)."""
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < K
    x = tl.load(X + row.to(tl.int64) * stride_x + offsets, mask=mask, other=0.0).to(tl.float32)
    q, scale = fp8_row_codes(x, FP8_MAX)
    tl.store(Q + row.to(tl.int64) * stride_q + offsets, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + row, scale)


def quantize_rows_fp8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8.quantize_rows` of rows [M, K] (last dim contiguous): one Triton kernel on CUDA, the reference elsewhere
    (the interpreter has no float8 type)."""
    if not rows.is_cuda or rows.stride(-1) != 1:
        return fp8_format.quantize_rows(rows)
    m, k = rows.shape
    q = torch.empty((m, k), dtype=fp8_format.FP8, device=rows.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=rows.device)
    block, num_warps = row_launch_settings(k)
    with device_guard(rows):
        _quantize_rows_fp8_kernel[(m,)](rows, q, scale, rows.stride(0), q.stride(0), k, FP8_MAX=fp8_format.FP8_MAX,
                                        BLOCK=block, num_warps=num_warps)
    return q, scale


# Up to this many rows (decode steps), `fp8_linear` reads the FP8 weights in a GEMV and leaves the activations in the
# model's dtype: at these sizes the step is bound by reading the weights, which FP8 halves, and quantizing a few rows
# would cost a launch per linear for no speed. Beyond it, both operands are FP8 and the GEMM runs on FP8 tensor cores.
FP8_WEIGHT_ONLY_MAX_ROWS = 16


def fp8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (float), qweight [N, K] e4m3, weight_scale [N] fp32 -> [..., N] in x's dtype. Up to
    FP8_WEIGHT_ONLY_MAX_ROWS rows (all of x's leading dims): x @ dequantized W^T in fp32; beyond: x quantized per row
    to e4m3 too, the product in fp32 scaled by x_scale[m] * w_scale[n]. A 2-D weight_scale: a block-scaled
    checkpoint's weight, `fp8_block_linear_ref`."""
    if weight_scale.dim() == 2:
        return fp8_block_linear_ref(x, qweight, weight_scale, bias)
    if x.numel() // max(x.shape[-1], 1) <= FP8_WEIGHT_ONLY_MAX_ROWS:
        y = x.float() @ (qweight.float() * weight_scale[:, None]).t()
    else:
        xq, x_scale = fp8_format.quantize_rows(x)
        y = (xq.float() @ qweight.float().t()) * x_scale * weight_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_block_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale_inv: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Block-scaled FP8 weights (a checkpoint's, `fp8.dequantize_blocks`), weight-only: x @ W^T in fp32, in x's
    dtype."""
    bias = None if bias is None else bias.float()
    return F.linear(x.float(), fp8_format.dequantize_blocks(qweight, scale_inv), bias).to(x.dtype)


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """`fp8_linear_ref`'s math; on CUDA the skinny GEMM reading FP8 weights (few rows), else an FP8 tensor-core GEMM.
    A 2-D `weight_scale` is a block-scaled checkpoint's (`fp8_block_linear_ref`, weight-only at every size): up to 16
    rows the skinny GEMM reads the weights with their block scales; up to BLOCK_FP8_GEMM_MAX_ROWS a GEMM dequantizes
    its tiles in its K loop (BLOCK_FP8_GEMM); more rows on CUDA dequantize the weight into x's dtype on every call for
    cuBLAS (load_prequantized warns)."""
    n, k = qweight.shape
    rows = x.reshape(-1, k)
    if weight_scale.dim() == 2:
        if use_triton(x) and 0 < rows.shape[0] and _block_gemv_fits(qweight, weight_scale):
            if rows.shape[0] <= FP8_WEIGHT_ONLY_MAX_ROWS:
                return _weight_gemv(rows, qweight, weight_scale, bias).reshape(*x.shape[:-1], n)
            if BLOCK_FP8_GEMM and rows.shape[0] <= BLOCK_FP8_GEMM_MAX_ROWS and rows.dtype != torch.float32:
                return _fp8_block_gemm(rows, qweight, weight_scale, bias).reshape(*x.shape[:-1], n)
        if not x.is_cuda:
            return fp8_block_linear_ref(x, qweight, weight_scale, bias)
        return F.linear(x, _dequantized_blocks(qweight, weight_scale, x.dtype), bias)
    if use_triton(x) and 0 < rows.shape[0] <= FP8_WEIGHT_ONLY_MAX_ROWS:
        return _weight_gemv(rows, qweight, weight_scale, bias).reshape(*x.shape[:-1], n)
    if not fp8_gemm_fits(x, qweight, weight_scale):
        return fp8_linear_ref(x, qweight, weight_scale, bias)
    return fp8_gemm(*quantize_rows_fp8(rows), qweight, weight_scale, bias, x.dtype).reshape(*x.shape[:-1], n)


def _dequantized_blocks(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A block-scaled FP8 weight in `dtype` for cuBLAS (`fp8.dequantize_blocks`' bits): with BLOCK_FP8_DEQUANT_KERNEL
    in one kernel where the blocks tile the weight, else in PyTorch."""
    (n, k), (rows, cols) = qweight.shape, scale.shape
    if BLOCK_FP8_DEQUANT_KERNEL and rows and cols and not n % rows and not k % cols and qweight.stride(1) == 1:
        return dequantize_blocks_kernel(qweight, scale, dtype)
    return fp8_format.dequantize_blocks(qweight, scale, dtype)


def fp8_gemm_fits(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    """Whether `fp8_gemm` takes x's rows against this weight: CUDA, one scale per output channel, K and N multiples of
    16 (what fp8_linear checks past the decode GEMV; also the kernels/fp8_input_linear.py launchers')."""
    n, k = qweight.shape
    return x.is_cuda and weight_scale.dim() == 1 and not k % 16 and not n % 16


def fp8_gemm(codes: torch.Tensor, row_scales: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Rows quantized per row (e4m3 codes [M, K], scales [M, 1]) times the FP8 weight on FP8 tensor cores (cuBLAS's
    `torch._scaled_mm`: the fp32 accumulator times row_scale[m] * weight_scale[n], plus the bias) -> [M, N]."""
    return torch._scaled_mm(codes, qweight.t(), scale_a=row_scales, scale_b=weight_scale[None, :], bias=bias,
                            out_dtype=out_dtype)


def _block_gemv_fits(qweight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether the skinny GEMM reads these block scales: blocks that tile the weight exactly and span a multiple of
    16 columns (its K chunks, at least tl.dot's 16, must each lie in one block column)."""
    (n, k), (rows, cols) = qweight.shape, scale.shape
    return rows > 0 and cols > 0 and n % rows == 0 and k % cols == 0 and (k // cols) % 16 == 0


def _weight_gemv(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """rows [M <= 16, K] @ (qweight [N, K] * scale)^T + bias through the skinny GEMM, which widens the 1-byte weights
    (float8 or int8) as it reads them and scales each output column in its epilogue ([N] scales) or each weight by
    its block's scale as it reads it (2-D block scales)."""
    m, k = rows.shape
    n = qweight.shape[0]
    out = torch.empty(m, n, dtype=rows.dtype, device=rows.device)
    if scale.dim() == 2:
        scale = scale.contiguous()  # the kernel steps through a row of block scales with unit stride
        cfg = skinny_gemm.block_scaled_config(m, n, k, rows.dtype, rows.device, k // scale.shape[1])
    else:
        cfg = skinny_gemm._config(m, n, k, rows.dtype, rows.device, weight_bytes=qweight.element_size())
    skinny_gemm._launch(rows.contiguous(), qweight, bias, out, None, cfg, weight_scale=scale)
    return out


def int8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K], qweight [N, K] int8, scale [N] fp32 -> [..., N] in x's dtype (fp32 math)."""
    return F.linear(x.float(), dequantize_int8(qweight, scale), None if bias is None else bias.float()).to(x.dtype)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """`int8_linear_ref`'s math: up to 16 rows the skinny GEMM reads the int8 weights (Triton: CUDA, or the CPU
    inside `triton_on_cpu()`); more rows on CUDA dequantize into x's dtype for cuBLAS; the CPU runs the reference."""
    n, k = qweight.shape
    rows = x.reshape(-1, k)
    if use_triton(x) and 0 < rows.shape[0] <= FP8_WEIGHT_ONLY_MAX_ROWS:
        return _weight_gemv(rows, qweight, scale, bias).reshape(*x.shape[:-1], n)
    if not x.is_cuda:
        return int8_linear_ref(x, qweight, scale, bias)
    return F.linear(x, dequantize_int8(qweight, scale, x.dtype), bias)


# int4 decode (up to 16 rows). Measured on an H200 (Llama-3.1-8B's projections, group 128, in CUDA graphs): the former
# GEMV, a program per (row, 16 outputs), read the whole weight once per row: 10-29% of copy bandwidth at M = 1 and
# 4-5% at M = 8. This one reads it once for all rows, in chunks of one group (a scale and zero per output row, no
# gathers), pipelined through shared memory: 20-37% at M = 1, 19-32% at M = 8 (there 4-7x the former).
# 2026-11-30, one row: the loop issues fewer instructions a nibble (the weight read as int32 words, each nibble made
# an fp32 number by a shift and a LOP3: _int4_mantissa), 6.4 against 6.8 in sm_90 SASS at 4 warps, and the launch
# settings come from a sweep of this kernel (8 KB chunks, 8 warps, up to 8 K splits summed in the kernel): 26-37% of
# copy bandwidth at the four projections (bench_quant_gemv's files -int4-mantissa-sweep), W1-int4 311.1 tok/s against
# 276.4 for the kernel before in the same session (W1-int4-...-mantissa-8kb and -head-kernel). Measured slower: a
# [BLOCK_N, GROUP] accumulator summed once after the loop (5.3 instructions a nibble, but 167 registers a thread:
# 247 tok/s, -acc2d). That loop issued ~6 instructions a nibble (product, sum tree, offset, extraction) where the
# weight's bytes arrive at ~0.7 per clock an SM; with bf16 x it now runs in packed bf16x2 math (INT4_PACKED_BF16):
# 33-53% of copy bandwidth at 1 row, W1-int4 1.59x bf16. The four projections then issue ~40% of what the SMs can, so
# what bounds them now is latency (short programs of 4 groups each; a sweep of stages, warps and splits found nothing
# more than ~4% better: -int4-packed-stages-sweep.json).
_INT4_CHUNK_NIBBLES = 8192  # BLOCK_N * GROUP: 4 KB of packed weight a chunk (BLOCK_N 64 at group 128); 8 KB at one row
_INT4_MAGIC = {torch.float16: 0x6400, torch.bfloat16: 0x4300, torch.float32: 0}  # bits of 1024.0 (fp16), 128.0 (bf16)
_INT4_CONFIGS: dict[tuple, dict] = {}
# Whether the int4 decode kernel sums its own K splits where the caller passes split_counters (no reduce kernel: one
# launch fewer for each split projection). GPU-tested and measured on an H200 (2026-11-30, one call, W1-int4 of
# Llama-3.1-8B): 276.1 tok/s against 274.2 with the reduce kernel (W1-int4-...-reduce-in-kernel.json).
REDUCE_SPLITS_IN_KERNEL = True
# Whether one or two bf16 rows on CUDA take the packed bf16x2 form of the broadcast loop (_int4_bf16x2_word_dot, inline
# PTX: not in the interpreter), the products and the sum of a word's eight rounded to bf16 before the fp32 sums (see
# the function for why that is accurate enough): 3.1 sm_90 SASS instructions a nibble at its launch settings (395 a
# thread's 128-nibble chunk, loads and sums included) against the fp32 loop's 6.4-7.2. Measured on an H200
# (2026-11-30): 1.26-1.42x the fp32 loop's speed at Llama-3.1-8B's four projections at 1 row, 1.44-1.76x at 2 rows
# (their launch settings unchanged: -int4-two-rows.json), W1-int4 380.5 tok/s against 311.1 in the same call
# (W1-int4-...-packed-final.json, W5-quant-gemv-...-int4-packed-final.json).
INT4_PACKED_BF16 = True
# Groups of each row a chunk of the one-row packed loop holds (1: a chunk is one group of BLOCK_N rows). A group is 64
# bytes of a row at group 128 and the rows are K / 2 bytes apart, so one group a chunk reads the weight in 64-byte
# pieces; four make 256-byte runs of each row. Measured on an H200 (2026-12-01, Llama-3.1-8B's four projections at one
# row, group 128): one group a chunk at its launch settings 8.0 / 6.6 / 27.8 / 14.4 us (qkv / o / gate_up / down);
# 2, 4 and 8 groups a chunk at 8 and 16 KB chunks, 4 and 8 warps, 2 / 4 / 8 K splits: 4 groups in 16 KB chunks (64
# rows) and 4 warps the best or within ~5% at each, 8 warps slower (W5-quant-gemv-...-int4-chunk-groups.json). Its K
# splits (1-8, -int4-chunk4-splits.json): 7.5 / 6.2 / 20.7 / 11.9 us at the best of each, ~2 programs an SM (2 / 4 /
# 1 / 4 splits) within 0.5 us of it; in the decode step ~4 an SM measured faster (INT4_ONE_ROW_PROGRAMS_PER_SM).
# W1-int4 at ~2 an SM 426.1 tok/s (1.77x bf16's 240.7; W1-int4-...-chunk4.json), and in one call with a minimum of
# 2 splits 429.4 against 372.0 for one group a chunk (-chunk4-min2-splits.json). Measured at group 128 only; at
# groups 32 and 64 four groups make runs of 64 and 128 bytes. Two rows: INT4_TWO_ROW_CHUNK_GROUPS.
INT4_CHUNK_GROUPS = 4
# Groups of each row a chunk of the two-row packed loop holds, in 8 KB chunks (BLOCK_N 64 at group 128), 4 warps, ~2
# programs an SM and at least 2 K splits. Measured on an H200 (2026-12-02, Llama-3.1-8B's four projections at two rows,
# group 128; W5-quant-gemv-...-20261202-int4-two-row-chunks.json): one group a chunk at its launch settings 14.7 / 9.3
# / 49.7 / 23.5 us (qkv / o / gate_up / down); 1, 2 and 4 groups a chunk at 4-16 KB, 4 and 8 warps, 2 / 4 / 8 splits:
# these settings 11.5 / 7.8 / 30.5 / 17.3 us, each the sweep's best or within 0.2 us of it (gate_up's 448 blocks
# would take one split by the ~2 programs an SM: one split was not in that sweep, which is why the minimum is 2). As
# the default in a later call: 11.5 / 7.8 / 30.8 / 17.4 us (-int4-defaults-two-row-chunks.json; 8 rows 103.0 us for
# the four against 109.8).
INT4_TWO_ROW_CHUNK_GROUPS = 2
# Programs an SM the one-row packed loop's K splits aim at in chunks of several groups (two rows: 2, see above). 4, not
# the standalone sweep's 2: W1-int4 on an H200 (2026-12-02, Llama-3.1-8B, two calls, each beside the default of 2 in
# the same call: bench_quant --kernel-settings int4_programs<P>) ran 438.5 and 439.9 tok/s at 4 against 428.4 and
# 428.5 at 2, 411.8 at 1, 426.5 at 8 (W1-int4-nvidia-h200-20261202-programs-1-4.json, -programs-4-8.json). At 4 the
# four projections split K 5 (so 4: whole chunks) / 8 / 1 / 8 ways (qkv / o / gate_up / down), at 2 2 / 4 / 1 / 4:
# the small projections take more splits in the step than alone (there the splits measured within 0.5 us).
INT4_ONE_ROW_PROGRAMS_PER_SM = 4
# The dot form's (3 to 16 rows) groups an iteration, their loads of each row's adjacent pieces issued together and
# each group's dot as before (the same bits). Measured on an H200 (2026-12-02, the four projections at 8 rows, its K
# splits, half and twice as many; -int4-two-row-chunks.json): 2 groups no faster (down 25.7 us against 26.7, qkv and
# o_proj 0.4-3 us slower), 4 slower at each (up to 16 us): one group. That sweep also found gate_up (448 blocks, one
# split by ~2 programs an SM) 47.1 us in 2 splits against 54.1 in one: the dot form also takes at least 2 splits.
INT4_DOT_CHUNK_GROUPS = 1


@triton.jit
def _bf16_pairs(low_cols, high_cols):
    """Two int32 words of bf16 x, (x[c], x[c + 1]) and (x[c + 4], x[c + 5]) -> the pairs in nibble order
    (x[c], x[c + 4]) and (x[c + 1], x[c + 5]): the pairing of the halves a LOP3 makes from nibbles i and i + 4 of a
    word (_int4_bf16x2_word_dot; one PRMT each)."""
    return tl.inline_asm_elementwise(
        "prmt.b32 $0, $2, $3, 0x5410; prmt.b32 $1, $2, $3, 0x7632;",
        "=r,=r,r,r", [low_cols, high_cols], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _int4_bf16x2_word_dot(words, p0, p1, p2, p3, neg_offset):
    """For each int32 word of eight nibbles: sum over i of (nibble_i - zero) * x_i, in packed bf16x2 math, as fp32.
    p0..p3: x's pairs (x[i], x[i + 4]) for i = 0..3 as bf16x2 words (_bf16_pairs); neg_offset: -(128 + zero) in both
    halves. A LOP3 makes the pair of nibbles i and i + 4 two bf16 numbers 128 + nibble (exact: bf16 counts in ones from
    128 to 256), one FMA takes 128 + zero off (exact: whole numbers in -16..15), four FMAs multiply by x and sum, the
    two halves are added in fp32: 21 instructions for eight nibbles (the two constants' moves hoisted).

    Accuracy: a product of a whole number |v| <= 16 and a bf16 x is rounded to bf16 (a relative error <= 2^-9), and so
    is each of the three sums after it; across a dot of K products these errors are independent, ~2^-9 relative to
    the output's size or below, the size of the bf16 rounding the output gets anyway, and far below int4's own
    quantization error (its SQNR against the float weight is ~20-25 dB). No overflow: bf16 has fp32's range."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 n0, n1, n2, n3, t, one, negzero, acc, lo, hi;
        mov.b32 one, 0x3F803F80;
        mov.b32 negzero, 0x80008000;
        lop3.b32 n0, $1, 0x000F000F, 0x43004300, 0xEA;
        shr.u32 t, $1, 4;
        lop3.b32 n1, t, 0x000F000F, 0x43004300, 0xEA;
        shr.u32 t, $1, 8;
        lop3.b32 n2, t, 0x000F000F, 0x43004300, 0xEA;
        shr.u32 t, $1, 12;
        lop3.b32 n3, t, 0x000F000F, 0x43004300, 0xEA;
        fma.rn.bf16x2 n0, n0, one, $6;
        fma.rn.bf16x2 n1, n1, one, $6;
        fma.rn.bf16x2 n2, n2, one, $6;
        fma.rn.bf16x2 n3, n3, one, $6;
        fma.rn.bf16x2 acc, n0, $2, negzero;
        fma.rn.bf16x2 acc, n1, $3, acc;
        fma.rn.bf16x2 acc, n2, $4, acc;
        fma.rn.bf16x2 acc, n3, $5, acc;
        shl.b32 lo, acc, 16;
        and.b32 hi, acc, 0xFFFF0000;
        add.f32 $0, lo, hi;
        }""",
        "=r,r,r,r,r,r,r", [words, p0, p1, p2, p3, neg_offset], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _int4_bf16x2_row_dot(XW, words, neg_offset, first_word, NW: tl.constexpr):
    """One bf16 row (XW: the row as int32 words, two columns each) against a chunk's words [R, NW], whose first word
    holds weight column 8 first_word: [R, NW] fp32 sums of (nibble - zero) * x, a word's eight columns each.
    neg_offset: the packed -(128 + zero) of each word ([R, 1] or [R, NW])."""
    j = (first_word + tl.arange(0, NW)) * 4  # x's word 4j + c holds x columns 8j + 2c, 8j + 2c + 1
    p0, p1 = _bf16_pairs(tl.load(XW + j), tl.load(XW + j + 2))
    p2, p3 = _bf16_pairs(tl.load(XW + j + 1), tl.load(XW + j + 3))
    return _int4_bf16x2_word_dot(words, p0[None, :], p1[None, :], p2[None, :], p3[None, :], neg_offset)


@triton.jit
def _per_word(values, GW: tl.constexpr):
    """[R, G] values, one a group, -> [R, G * GW]: each repeated for the group's GW words (a chunk of G groups)."""
    R: tl.constexpr = values.shape[0]
    G: tl.constexpr = values.shape[1]
    return tl.reshape(tl.broadcast_to(values[:, :, None], [R, G, GW]), [R, G * GW])


@triton.jit
def _int4_columns(packed):
    """Packed bytes [R, C] (int32, 0..255) -> nibbles [R, 2C] in column order, byte j's low nibble column 2j and its
    high one 2j + 1 (tl.join keeps each pair in the thread that loaded the byte: no data moves between threads)."""
    return tl.reshape(tl.join(packed & 15, packed >> 4), [packed.shape[0], 2 * packed.shape[1]])


@triton.jit
def _int4_mantissa(words, NIBBLE: tl.constexpr):
    """Nibble NIBBLE (bits 4 NIBBLE..4 NIBBLE + 3) of each int32 word as the fp32 number 1 + nibble / 16: the nibble
    shifted into the top four bits of an fp32 mantissa (bits 19-22) under the exponent of 1.0. A shift and one
    LOP3 (the mask and the OR), where an integer-to-float conversion issues at a quarter of an FFMA's rate."""
    if NIBBLE < 5:
        bits = words << (19 - 4 * NIBBLE)
    else:
        bits = words >> (4 * NIBBLE - 19)  # arithmetic: the sign bits fall outside the mask
    return ((bits & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _int4_word_mantissas(words):
    """Packed words [R, C] (int32, the bytes of _int4_columns four at a time: column 8j + i in bits 4i..4i+3 of word j)
    -> [R, 8C] fp32 1 + nibble / 16 in column order. The nested joins keep a word's eight nibbles in the thread that
    loaded it and put nibble 4a + 2b + c at index [a, b, c] of their last three dimensions, which the reshape flattens
    to 4a + 2b + c."""
    even = tl.join(tl.join(_int4_mantissa(words, 0), _int4_mantissa(words, 4)),
                   tl.join(_int4_mantissa(words, 2), _int4_mantissa(words, 6)))
    odd = tl.join(tl.join(_int4_mantissa(words, 1), _int4_mantissa(words, 5)),
                  tl.join(_int4_mantissa(words, 3), _int4_mantissa(words, 7)))
    return tl.reshape(tl.join(even, odd), [words.shape[0], 8 * words.shape[1]])


@triton.jit
def _gated_rows(acc, HALF: tl.constexpr):
    """[2 HALF] values of a gated block's rows (gate rows, then their up rows) -> (gate, up), [HALF] each."""
    return tl.split(tl.permute(tl.reshape(acc, [2, HALF]), [1, 0]))


@triton.jit
def _gated_output(gate, up, Y_row, cols, inter, ACT: tl.constexpr):
    """Store act(gate) * up at Y_row[cols < inter]: gate and up (fp32, bias included) rounded to Y's dtype first, then
    multiplied in fp32 and rounded once (the linear's store, then `_act_and_mul_kernel`: the same bits)."""
    ty = Y_row.dtype.element_ty
    y = gated_activation(gate.to(ty).to(tl.float32), ACT) * up.to(ty).to(tl.float32)
    tl.store(Y_row + cols, y.to(ty), mask=cols < inter)


@triton.jit
def _gated_store(acc, B, Y_row, pid_n, n_load, inter, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 ACT: tl.constexpr):  # fmt: skip
    """A gated block's one-split result for one row of x: acc [BLOCK_N] fp32 by weight row (n_load) -> Y_row."""
    HALF: tl.constexpr = BLOCK_N // 2
    if HAS_BIAS:
        acc += tl.load(B + n_load).to(tl.float32)
    gate, up = _gated_rows(acc, HALF)
    _gated_output(gate, up, Y_row, pid_n * HALF + tl.arange(0, HALF), inter, ACT)


@triton.jit
def _gated_reduce_row(P, B, Y_row, m, pid_n, M, N, num_splits, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                      ACT: tl.constexpr):  # fmt: skip
    """The last program of a gated block: row m's partials of its gate and up rows summed in split order
    (`sum_split_partials`, as `reduce_split_row` sums them), + bias, then `_gated_output`. Other SMs wrote the
    partials: read past L1 (.cg)."""
    HALF: tl.constexpr = BLOCK_N // 2
    inter = N // 2
    cols = pid_n * HALF + tl.arange(0, HALF)
    mask = cols < inter
    gate = sum_split_partials(P, m, tl.where(mask, cols, N), M, N, num_splits, ".cg")
    up = sum_split_partials(P, m, tl.where(mask, inter + cols, N), M, N, num_splits, ".cg")
    if HAS_BIAS:
        gate += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        up += tl.load(B + inter + cols, mask=mask, other=0.0).to(tl.float32)
    _gated_output(gate, up, Y_row, cols, inter, ACT)


@triton.jit
def _int4_gemv_kernel(
    X,  # [M, K], row stride stride_xm, unit column stride
    W,  # [N, K // 2] uint8, unit column stride: column 2j in the low nibble of byte j, 2j + 1 in the high one; with
        # WORDS the same bytes as int32 [N, K // 8] (stride_wn in words)
    S,  # [N, K // GROUP] fp32 scales, row stride stride_sn, unit column stride
    Z,  # [N, K // GROUP] fp32 zero points, row stride stride_zn (read only with HAS_ZEROS; else the zero is 8)
    B,  # [N] bias (read only with HAS_BIAS)
    Y,  # [M, N], row stride stride_ym (written without SPLIT)
    P,  # [num_splits, M, N] fp32 partials, contiguous (written with SPLIT)
    COUNTERS,  # [>= number of n blocks] int32, zero on entry and on exit (read only with REDUCE)
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    groups_per_split,
    GROUP: tl.constexpr,  # a power of two >= 32
    HAS_BIAS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    SPLIT: tl.constexpr,
    REDUCE: tl.constexpr,  # with SPLIT: the last program of an n block sums the partials (no reduce kernel)
    USE_DOT: tl.constexpr,
    WORDS: tl.constexpr,  # broadcast form: W read as int32 words (_int4_word_mantissas, _int4_bf16x2_word_dot), not
                          # bytes (_int4_columns)
    MAGIC: tl.constexpr,  # 16-bit x: _INT4_MAGIC[x.dtype]; 0 for fp32 x
    PACKED_BF16: tl.constexpr,  # broadcast form, bf16 x, WORDS, CUDA: _int4_bf16x2_word_dot (INT4_PACKED_BF16)
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # dot form: 16 (rows >= M clamped to M - 1); broadcast form: M itself, 1 or 2
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # chunks in flight a program (tl.range pipelining through shared memory)
    USE_PDL: tl.constexpr = False,
    GATED: tl.constexpr = "",  # broadcast form: "silu", "gelu", "gelu_tanh": Y [M, N / 2] = act(gate) * up (below)
    CHUNK_GROUPS: tl.constexpr = 1,  # PACKED_BF16 or USE_DOT: groups an iteration (dividing groups_per_split)
):  # fmt: skip
    """Program (n block, split): y[m, n] for all M rows = sum over the split's groups g of scale[n, g] * (sum over the
    group's columns k of x[m, k] * (nibble[n, k] - zero[n, g])), the zero 8 (symmetric) or the group's own. A chunk is
    one group: [BLOCK_N, GROUP // 2] bytes (GROUP // 8 words with WORDS), one scale and zero a row, x's GROUP columns
    loaded contiguously.

    Broadcast form (M = 1, 2): (nibble - zero) / 16 in fp32 (made without a conversion instruction, see the loop)
    times x's row, summed over the group, times 16 scale.
    Dot form (M = 3..16): W is the dot's A operand (y^T = W x^T: on sm_90 a wgmma with W in registers, measured
    1.25-1.5x the x @ W^T orientation at M = 8) and x's rows are padded to 16. The codes enter the dot exactly: for
    16-bit x the nibble ORed into the mantissa of MAGIC is the number MAGIC + nibble (two integer ops, no conversion),
    and the group's sum of x times (MAGIC + zero) takes the offset off again in fp32; the scale multiplies the group's
    dot.

    GATED (a gate-up projection, W = [gate rows | up rows], N = 2I): program n block b takes gate rows bH..bH + H - 1
    and the up rows I apart from them (H = BLOCK_N / 2), summed as any rows are, and stores act(gate) * up for
    outputs bH..bH + H - 1 of Y [M, I]: the two rounded to Y's dtype first, then act(gate) * up in fp32, rounded once,
    as the linear's store and the activation kernel would (the same bits). Splits store their partials at the weight's
    rows; the last program of a block sums them (REDUCE is required)."""
    tl.static_assert(GATED == "" or not USE_DOT, "GATED: the broadcast form only")
    tl.static_assert(CHUNK_GROUPS == 1 or PACKED_BF16 or USE_DOT, "CHUNK_GROUPS > 1: the packed or the dot form")
    pdl_wait(USE_PDL)
    GW: tl.constexpr = GROUP // 8 if WORDS else GROUP // 2  # words (bytes) of a row in one group
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if GATED != "":
        HALF: tl.constexpr = BLOCK_N // 2
        inter = N // 2
        col = pid_n * HALF + tl.arange(0, BLOCK_N) % HALF  # the output column of each of the block's rows
        up_offset = tl.where(tl.arange(0, BLOCK_N) >= HALF, inter, 0)
        n = tl.where(col < inter, col + up_offset, N)  # weight rows; past the last output: N (never stored)
        n_load = (tl.minimum(col, inter - 1) + up_offset).to(tl.int64)
    else:
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_load = tl.minimum(n, N - 1).to(tl.int64)  # rows past N re-read row N - 1, never stored: no load masks
    # [BLOCK_N, RUN]: what one load reads of each row (the packed loop: its chunk's CHUNK_GROUPS groups; else one
    # group); group g's words (bytes) at + g * GW
    RUN: tl.constexpr = CHUNK_GROUPS * GW if PACKED_BF16 else GW
    w_ptrs = W + n_load[:, None] * stride_wn + tl.arange(0, RUN)[None, :]
    s_ptrs = S + n_load * stride_sn
    z_ptrs = Z + n_load * stride_zn
    zero = tl.full([BLOCK_N], 8.0, tl.float32)
    k = tl.arange(0, GROUP)
    g_begin = pid_k * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, K // GROUP)
    if USE_DOT:
        m = tl.arange(0, BLOCK_M)
        x_ptrs = X + tl.minimum(m, M - 1)[:, None] * stride_xm + k[None, :]  # [BLOCK_M, GROUP]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # y^T
        # CHUNK_GROUPS consecutive groups an iteration: their loads (adjacent pieces of each row) issued together, then
        # each group's dot in order, as one group an iteration would (the same sums: the same bits)
        for g0 in tl.range(g_begin, g_end, CHUNK_GROUPS, num_stages=NUM_STAGES):
            for c in tl.static_range(CHUNK_GROUPS):
                g = g0 + c
                scale = tl.load(s_ptrs + g)
                if HAS_ZEROS:
                    zero = tl.load(z_ptrs + g)
                x = tl.load(x_ptrs + g * GROUP)
                if MAGIC != 0:
                    codes = _int4_columns(tl.load(w_ptrs + g * GW).to(tl.int32))
                    w = (codes | MAGIC).to(tl.int16).to(X.dtype.element_ty, bitcast=True)  # MAGIC + nibble, exact
                    part = tl.dot(w, tl.trans(x), input_precision=DOT_PRECISION)
                    offset = (1024.0 if MAGIC == 0x6400 else 128.0) + zero
                    part -= offset[:, None] * tl.sum(x.to(tl.float32), axis=1)[None, :]
                else:  # fp32 x (tests): the codes less the zero, exact in fp32
                    part = tl.dot(_int4_columns(tl.load(w_ptrs + g * GW).to(tl.int32)).to(tl.float32) - zero[:, None],
                                  tl.trans(x), input_precision=DOT_PRECISION)
                acc += part * scale[:, None]
        _epilogue(tl.trans(acc), m, n, pid_k, M, N, B, Y, P, P, P, stride_ym, 0, HAS_BIAS, SPLIT, False,
                  False)
    else:
        # Per nibble: two instructions make the number 1 + nibble / 16 (_int4_mantissa; from bytes without WORDS: the
        # codes, then the same bits), one FADD takes 1 + zero / 16 off (exact for the symmetric zero 8: both numbers
        # in [1, 2)), leaving (nibble - zero) / 16; the group's sum of its products with x is scaled by 16 scale.
        # An int-to-float conversion and the codes' byte extraction cost more (sm_90 SASS at 4 warps: 6.4
        # instructions a nibble here, 6.8 before); a [BLOCK_N, GROUP] accumulator summed after the loop saves the
        # group's adds but takes ~170 registers a thread and measured slower.
        acc0 = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)  # unused (compiled away) with one row
        # The packed loop keeps each word's scaled sums apart, summed once after the loop: no shuffles between threads
        # every group (395 against 429 SASS instructions a chunk, 80 registers a thread against 56; measured
        # 1.02-1.05x at three of Llama-3.1-8B's projections, the same at gate_up with 8 splits: -sum-after-loop).
        # CHUNK_GROUPS > 1: a chunk holds that many consecutive groups of each of its rows (longer runs of each row a
        # load; the same bytes a chunk with BLOCK_N as many times smaller), each word scaled by its own group's scale.
        CW: tl.constexpr = CHUNK_GROUPS * GW
        by_word0 = tl.zeros([BLOCK_N, CW], dtype=tl.float32)
        by_word1 = tl.zeros([BLOCK_N, CW], dtype=tl.float32)
        for g in tl.range(g_begin, g_end, CHUNK_GROUPS, num_stages=NUM_STAGES):
            if PACKED_BF16:
                # each word's scale and zero: [BLOCK_N, 1] where a chunk has one group (or the zero is 8), else
                # [BLOCK_N, CW], each group's repeated for its words
                chunk = g + tl.arange(0, CHUNK_GROUPS)[None, :]
                if CHUNK_GROUPS == 1:
                    scale = tl.load(s_ptrs + g)[:, None]
                else:
                    scale = _per_word(tl.load(s_ptrs[:, None] + chunk), GW)
                if HAS_ZEROS and CHUNK_GROUPS > 1:
                    zeros = _per_word(tl.load(z_ptrs[:, None] + chunk), GW)
                else:
                    if HAS_ZEROS:
                        zero = tl.load(z_ptrs + g)
                    zeros = zero[:, None]
                half = (-128.0 - zeros).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                neg_offset = half | (half << 16)
                words = tl.load(w_ptrs + g * GW)
                XW = X.to(tl.pointer_type(tl.int32), bitcast=True)
                by_word0 += _int4_bf16x2_row_dot(XW, words, neg_offset, g * GW, CW) * scale
                if BLOCK_M > 1:
                    by_word1 += _int4_bf16x2_row_dot(XW + stride_xm // 2, words, neg_offset, g * GW, CW) * scale
            else:
                if WORDS:
                    mantissas = _int4_word_mantissas(tl.load(w_ptrs + g * GW))
                else:
                    codes = _int4_columns(tl.load(w_ptrs + g * GW).to(tl.int32))
                    mantissas = ((codes << 19) | 0x3F800000).to(tl.float32, bitcast=True)
                scale = tl.load(s_ptrs + g) * 16.0
                if HAS_ZEROS:
                    zero = tl.load(z_ptrs + g)
                w = mantissas - (1.0 + zero * 0.0625)[:, None]  # (nibble - zero) / 16
                acc0 += tl.sum(w * tl.load(X + g * GROUP + k).to(tl.float32)[None, :], axis=1) * scale
                if BLOCK_M > 1:
                    acc1 += tl.sum(w * tl.load(X + stride_xm + g * GROUP + k).to(tl.float32)[None, :], axis=1) * scale
        if PACKED_BF16:
            acc0 = tl.sum(by_word0, axis=1)
            acc1 = tl.sum(by_word1, axis=1)
        row = tl.zeros([1], dtype=tl.int32)
        if GATED != "" and not SPLIT:
            _gated_store(acc0, B, Y, pid_n, n_load, N // 2, HAS_BIAS, BLOCK_N, GATED)
            if BLOCK_M > 1:
                _gated_store(acc1, B, Y + stride_ym, pid_n, n_load, N // 2, HAS_BIAS, BLOCK_N, GATED)
        else:
            _epilogue(acc0[None, :], row, n, pid_k, M, N, B, Y, P, P, P, stride_ym, 0, HAS_BIAS, SPLIT, False,
                      False)
            if BLOCK_M > 1:
                _epilogue(acc1[None, :], row + 1, n, pid_k, M, N, B, Y, P, P, P, stride_ym, 0, HAS_BIAS, SPLIT,
                          False, False)
    if SPLIT and REDUCE:
        # As the decode attention merges its splits (kernels/paged_attention.py): every thread's partial stores
        # before the arrival (the barrier), the arrival's release/acquire makes all programs' visible to the last.
        tl.debug_barrier()
        counter = COUNTERS + pid_n
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == tl.num_programs(1) - 1:
            tl.store(counter, 0)  # ready for the next launch
            for row_m in range(M):
                if GATED != "":
                    _gated_reduce_row(P, B, Y + row_m * stride_ym, row_m, pid_n, M, N, tl.num_programs(1), HAS_BIAS,
                                      BLOCK_N, GATED)  # fmt: skip
                else:
                    reduce_split_row(P, B, Y, Y, row_m, n, M, N, stride_ym, 0, tl.num_programs(1), HAS_BIAS, False,
                                     ".cg")  # fmt: skip


def _int4_config(m: int, n: int, k: int, group: int, device: torch.device, packed_bf16: bool = False) -> dict:
    """Decode launch settings (cached: eager decode calls this for every layer). One row: chunks of 8 KB (BLOCK_N 128
    at group 128) and K split (up to 8 ways, splits of >= _MIN_SPLIT_COLUMNS columns) for a number of programs an SM:
    the packed bf16x2 loop 4 warps and up to 16 programs an SM (so 8 splits at each of Llama-3.1-8B's projections),
    the fp32 loop 8 warps and ~8. Each is its loop's sweep best or within 0.6 us of it at those four projections (H200,
    bench_quant_gemv --sweep, 2026-11-30: -int4-sum-after-loop-sweep.json, -int4-mantissa-sweep.json). Fewer splits
    measured slower for the packed loop: gate_up in 2 splits 34.9 us, in 8 27.9 (-int4-sum-after-loop-sweep). Two
    rows and the dot form: 4 KB chunks, 4 warps, ~2 programs an SM (skinny_gemm's heuristic), as measured before
    (with the fp32 loop). K split 2-16 ways at the packed loop's other settings (2026-12-01, --int4-splits:
    W5-quant-gemv-...-20261201-int4-splits-gated.json): 8 within 3% of the best at each of the four projections.
    Those are the settings of one group a chunk; the packed loop now takes chunks of several groups where that
    divides K's groups: one row INT4_CHUNK_GROUPS in 16 KB chunks, ~INT4_ONE_ROW_PROGRAMS_PER_SM programs an SM, two
    rows INT4_TWO_ROW_CHUNK_GROUPS in 8 KB chunks, ~2 programs an SM, 4 warps (see those). Two rows and the dot form
    take at least 2 K splits (see INT4_TWO_ROW_CHUNK_GROUPS and INT4_DOT_CHUNK_GROUPS)."""
    if packed_bf16 and m <= 2:
        chunk_groups = INT4_CHUNK_GROUPS if m == 1 else INT4_TWO_ROW_CHUNK_GROUPS
    else:
        chunk_groups = INT4_DOT_CHUNK_GROUPS if m > 2 else 1
    if (k // group) % chunk_groups:
        chunk_groups = 1
    key = (m, n, k, group, device, packed_bf16, chunk_groups)
    cfg = _INT4_CONFIGS.get(key)
    if cfg is None:
        use_dot = m > 2
        min_split = 1 if m == 1 or (m == 2 and not packed_bf16) else 2  # measured: the packed loop and dot form
        if chunk_groups > 1 and not use_dot:  # the packed loop in chunks of several groups a row
            chunk_nibbles = (4 if m == 1 else 2) * _INT4_CHUNK_NIBBLES
            block_n, max_split = max(1, chunk_nibbles // group // chunk_groups), 8
            num_warps, programs_per_sm = 4, INT4_ONE_ROW_PROGRAMS_PER_SM if m == 1 else 2
        elif m == 1:
            block_n, max_split = 2 * _INT4_CHUNK_NIBBLES // group, 8
            num_warps, programs_per_sm = (4, 16) if packed_bf16 else (8, 8)
        else:
            block_n, num_warps = max(16, _INT4_CHUNK_NIBBLES // group), 4
            programs_per_sm, max_split = skinny_gemm._PROGRAMS_PER_SM, skinny_gemm._MAX_SPLIT_K
        target = programs_per_sm * sm_count(device)
        wanted = max(min_split, target // skinny_gemm._cdiv(n, block_n))
        split_k = max(1, min(wanted, k // skinny_gemm._MIN_SPLIT_COLUMNS, max_split))
        cfg = _INT4_CONFIGS[key] = {"USE_DOT": use_dot, "BLOCK_M": 16 if use_dot else m, "BLOCK_N": block_n,
                                    "NUM_STAGES": 3, "num_warps": num_warps, "split_k": split_k,
                                    "CHUNK_GROUPS": chunk_groups}  # fmt: skip
    return cfg


@functools.cache
def _has_bf16x2_math(device_index: int) -> bool:
    """Whether the device runs INT4_PACKED_BF16's inline PTX: an NVIDIA GPU (not a ROCm build's) of compute
    capability 8.0+ (packed bf16x2 FMAs)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index) >= (8, 0)


def _int4_packed_bf16(rows: torch.Tensor, words: torch.Tensor | None) -> bool:
    """Whether one or two contiguous rows take the packed bf16x2 loop: INT4_PACKED_BF16, bf16 rows on CUDA (the
    inline PTX does not run in the interpreter) that the kernel can read as int32 words (4-byte aligned), the weight
    readable as words."""
    if not (INT4_PACKED_BF16 and rows.shape[0] <= 2 and rows.dtype == torch.bfloat16 and rows.is_cuda):
        return False
    index = rows.device.index if rows.device.index is not None else torch.cuda.current_device()
    return words is not None and rows.data_ptr() % 4 == 0 and _has_bf16x2_math(index)


def _int4_words(packed: torch.Tensor) -> torch.Tensor | None:
    """packed's bytes as int32 words [N, K // 8] where its layout allows (unit column stride, row stride and offset
    multiples of 4 bytes: any weight the quantize pass stores), else None (the kernel then reads bytes)."""
    if packed.stride(1) != 1 or packed.shape[1] % 4 or packed.stride(0) % 4 or packed.storage_offset() % 4:
        return None
    return packed.view(torch.int32)


def _int4_gemv(rows: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
               zeros: torch.Tensor | None, *, split_k: int | None = None,
               split_counters: torch.Tensor | None = None, activation: str | None = None,
               pdl: bool = True) -> torch.Tensor | None:
    """rows [M <= 16, K] through `_int4_gemv_kernel`; split_k (tests) overrides the heuristic's (splits are whole
    groups, none empty: possibly fewer). With split_counters (int4_linear's) and REDUCE_SPLITS_IN_KERNEL, the
    kernel sums its own splits, else `_split_k_reduce_kernel` does (the same sums: the same result). No host sync;
    the only allocations are out and the split-K workspace (from the graph's pool during CUDA-graph capture).

    activation ("silu", "gelu", "gelu_tanh"; M <= 2): a gate-up projection's act(gate) * up [M, N / 2] (GATED in the
    kernel), or None where the kernel cannot make it (its K splits would need the reduce kernel): the caller then
    runs the linear and the activation kernel."""
    m, k = rows.shape
    n = packed.shape[0]
    num_groups = scales.shape[1]
    group = k // num_groups
    rows = rows.contiguous()
    words = _int4_words(packed)
    packed_bf16 = _int4_packed_bf16(rows, words)
    cfg = _int4_config(m, n, k, group, rows.device, packed_bf16)
    chunk_groups = cfg.get("CHUNK_GROUPS", 1) if packed_bf16 or cfg["USE_DOT"] else 1
    if num_groups % chunk_groups:
        chunk_groups = 1  # a config given for another shape (a benchmark's sweep)
    # splits of whole chunks, none empty (so possibly fewer)
    num_splits, groups_per_split = skinny_gemm._split(num_groups, chunk_groups, split_k or cfg["split_k"])
    split = num_splits > 1
    blocks = triton.cdiv(n, cfg["BLOCK_N"])
    reduce = split and REDUCE_SPLITS_IN_KERNEL and split_counters is not None and split_counters.numel() >= blocks
    if activation is not None and (cfg["USE_DOT"] or n % 2 or (split and not reduce)):
        return None
    out = torch.empty(m, n // 2 if activation else n, dtype=rows.dtype, device=rows.device)
    parts = skinny_gemm._workspace(rows.device, num_splits * m * n) if split else out  # not touched without a split
    b = bias if bias is not None else out  # never read without a bias
    z = zeros if zeros is not None else scales  # never read without zeros
    pdl = pdl_options(rows) if pdl else {}
    if cfg["USE_DOT"]:
        # The dot form reads bytes: its operands made from words (two halves a shift and a LOP3, symmetric weights
        # as nibble - 8 by packed subtractions) measured slower on an H200 (2026-11-30, M = 8: 1.14-1.23x the time
        # at Llama-3.1-8B's projections; no faster at M = 1: W5-quant-gemv-...-int4next.json) and was removed.
        words = None
    with device_guard(rows):
        _int4_gemv_kernel[(blocks, num_splits)](
            rows, packed if words is None else words, scales, z, b, out, parts, split_counters if reduce else scales,
            m, n, k, rows.stride(0), packed.stride(0) if words is None else words.stride(0), scales.stride(0),
            z.stride(0), out.stride(0), groups_per_split,
            GROUP=group, HAS_BIAS=bias is not None, HAS_ZEROS=zeros is not None, SPLIT=split, REDUCE=reduce,
            USE_DOT=cfg["USE_DOT"], WORDS=words is not None, PACKED_BF16=packed_bf16,
            MAGIC=_INT4_MAGIC[rows.dtype], DOT_PRECISION="ieee" if rows.dtype == torch.float32 else "tf32",
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
            GATED=activation or "", CHUNK_GROUPS=chunk_groups, **pdl,
        )  # fmt: skip
        if split and not reduce:  # sums the partials in split order (deterministic), adds the bias, rounds once
            skinny_gemm._split_k_reduce_kernel[(m, triton.cdiv(n, skinny_gemm._REDUCE_BLOCK))](
                parts, b, out, out, m, n, out.stride(0), 0, num_splits,
                HAS_BIAS=bias is not None, BLOCK_N=skinny_gemm._REDUCE_BLOCK, num_warps=4, **pdl,
            )  # fmt: skip
    return out


@triton.jit
def _gemm_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile (rows m [BLOCK_M], columns n [BLOCK_N]) of a grid of cdiv(M, BLOCK_M) x
    cdiv(N, BLOCK_N) programs: GROUP_M row blocks take their turns on the same column blocks of W (L2 reuse)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _int4_gemm_kernel(
    X,  # [M, K], row stride stride_xm, unit column stride
    W, S, Z, B,  # as in _int4_gemv_kernel
    Y,  # [M, N], row stride stride_ym
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides GROUP: a K step has one scale (and zero) per output column
    GROUP_M: tl.constexpr,  # row blocks that take their turns on the same column blocks of W (L2 reuse)
):  # fmt: skip
    """Program (m block, n block) of y = x @ W^T + bias with W's [BLOCK_N, BLOCK_K] tiles dequantized in the K loop:
    (nibble - zero) * scale rounded to x's dtype, the weight cuBLAS read before (dequantize_int4(..., x.dtype))."""
    m, n = _gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    n_load = tl.minimum(n, N - 1).to(tl.int64)  # rows past M and N clamped on load, masked on store
    x_ptrs = X + tl.minimum(m, M - 1).to(tl.int64)[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    w_ptrs = W + n_load[:, None] * stride_wn + tl.arange(0, BLOCK_K // 2)[None, :]
    s_ptrs = S + n_load * stride_sn
    z_ptrs = Z + n_load * stride_zn
    zero = tl.full([BLOCK_N], 8.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        codes = _int4_columns(tl.load(w_ptrs + k0 // 2).to(tl.int32))
        scale = tl.load(s_ptrs + k0 // GROUP)
        if HAS_ZEROS:
            zero = tl.load(z_ptrs + k0 // GROUP)
        w = ((codes.to(tl.float32) - zero[:, None]) * scale[:, None]).to(X.dtype.element_ty)
        acc = tl.dot(tl.load(x_ptrs + k0), tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    mask = (m < M)[:, None] & (n < N)[None, :]
    tl.store(Y + m.to(tl.int64)[:, None] * stride_ym + n[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def _int4_gemm_config(m: int, n: int, group: int, device: torch.device) -> dict:
    """128 x 128 tiles when they fill the GPU, else 64 x 64. Measured on an H200 (group 128, bf16): 360-375 TFLOP/s at
    M = 2048 (cuBLAS bf16 745-810; dequantizing the weight each call 190-200), 300 at 128 x 28672, 165-175 with 64 x 64
    tiles at 128 x 6144 and 128 x 4096 (K 14336), where 128 x 128 tiles leave SMs idle (75-105)."""
    if skinny_gemm._cdiv(m, 128) * skinny_gemm._cdiv(n, 128) >= sm_count(device):
        return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": min(group, 64), "GROUP_M": 8, "num_warps": 8,
                "num_stages": 3}  # fmt: skip
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": min(group, 128), "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def _int4_gemm(rows: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
               zeros: torch.Tensor | None) -> torch.Tensor:
    m, k = rows.shape
    n = packed.shape[0]
    cfg = _int4_gemm_config(m, n, k // scales.shape[1], rows.device)
    out = torch.empty(m, n, dtype=rows.dtype, device=rows.device)
    rows = rows.contiguous()
    z = zeros if zeros is not None else scales  # never read without zeros
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    with device_guard(rows):
        _int4_gemm_kernel[grid](
            rows, packed, scales, z, bias if bias is not None else out, out, m, n, k,
            rows.stride(0), packed.stride(0), scales.stride(0), z.stride(0), out.stride(0),
            GROUP=k // scales.shape[1], HAS_BIAS=bias is not None, HAS_ZEROS=zeros is not None,
            DOT_PRECISION="ieee" if rows.dtype == torch.float32 else "tf32", **cfg,
        )  # fmt: skip
    return out


# int4 prefill: from INT4_DEQUANT_MIN_ROWS rows the weight is dequantized into x's dtype by `_int4_dequantize_kernel`
# (reading 0.5 and writing 2 bytes a weight) and multiplied by cuBLAS, whose bf16 GEMM runs ~2x `_int4_gemm_kernel`
# (745-810 against 360-375 TFLOP/s at M = 2048 on an H200). Below it the dequantizing GEMM reads 4x fewer bytes.
# The transient weight comes from torch's caching allocator (the graph's pool under capture; the engine's activation
# measurement at max_num_batched_tokens sees it). Measured on an H200 (2026-11-30, bench_quant_gemv --prefill,
# -int4-prefill.json), Llama-3.1-8B's projections: at 512 rows dequantize + cuBLAS takes 0.59-0.87 of the GEMM's time,
# at 2048 0.60-0.63; at 128 the GEMM is as fast or faster (gate_up 96 us against 166). W1-int4's TTFT at 2048 tokens
# 56.1 ms against 87.5 before (bf16 55).
INT4_DEQUANT_MIN_ROWS = 512


@triton.jit
def _int4_dequantize_kernel(W, S, Z, OUT, N, stride_wn, stride_sn, stride_zn, stride_on,
                            GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Program (n block, group g): OUT[n, group g's columns] = (nibble - zero) * scale in fp32, rounded to OUT's dtype:
    dequantize_int4's operations in its order (the same bits)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    in_range = n < N
    rows = n.to(tl.int64)
    packed = tl.load(W + rows[:, None] * stride_wn + g * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :],
                     mask=in_range[:, None], other=0)  # fmt: skip
    zero = tl.full([BLOCK_N], 8.0, tl.float32)
    if HAS_ZEROS:
        zero = tl.load(Z + rows * stride_zn + g, mask=in_range, other=0.0)
    scale = tl.load(S + rows * stride_sn + g, mask=in_range, other=0.0)
    weight = (_int4_columns(packed.to(tl.int32)).to(tl.float32) - zero[:, None]) * scale[:, None]
    tl.store(OUT + rows[:, None] * stride_on + g * GROUP + tl.arange(0, GROUP)[None, :],
             weight.to(OUT.dtype.element_ty), mask=in_range[:, None])  # fmt: skip


def _int4_dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_int4(packed, scales, dtype, zeros)` in one kernel (no fp32 temporaries): [N, K] in dtype."""
    n, k = packed.shape[0], packed.shape[1] * 2
    group = k // scales.shape[1]
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    z = zeros if zeros is not None else scales  # never read without zeros
    block_n = max(1, 8192 // group)
    with device_guard(packed):
        _int4_dequantize_kernel[(triton.cdiv(n, block_n), scales.shape[1])](
            packed, scales, z, out, n, packed.stride(0), scales.stride(0), z.stride(0), out.stride(0),
            GROUP=group, HAS_ZEROS=zeros is not None, BLOCK_N=block_n, num_warps=4,
        )  # fmt: skip
    return out


# Block-scaled FP8 weights past 16 rows (prefill): `_fp8_block_gemm_kernel` widens W's tiles and applies their
# block's scale in its K loop, up to BLOCK_FP8_GEMM_MAX_ROWS rows; past that (and with BLOCK_FP8_GEMM off) fp8_linear
# dequantizes the whole weight into x's dtype on each call for cuBLAS. Measured on an H200 (bench_quant_gemv --prefill,
# 128x128 blocks, Llama-3.1-8B's four projections). Against PyTorch's dequantization (2026-11-30,
# W5-quant-gemv-nvidia-h200-20261130-int4-prefill.json) it was faster at every size timed (27-99 us against 184-1187
# at 128 rows), and it ran to 2048 rows. Against the dequantization in one kernel (BLOCK_FP8_DEQUANT_KERNEL below,
# 2026-12-02, W5-quant-gemv-nvidia-h200-20261202-blockfp8-prefill.json and -blockfp8-rows.json) it wins only up to
# 128 rows: there 253 us for the four against 323 (gate_up 94 against 168, the others within 2 us); from 160 rows
# (its tiles change past 128) the kernel and cuBLAS win at every projection but one tie (gate_up at 256: 187 against
# 194). The four at 160 / 256 / 512 / 2048 rows: 636 / 438 / 766 / 2459 us against 335 / 365 / 486 / 1471 (cuBLAS on
# bf16 weights 155 / 208 / 343 / 1331).
# GPU-tested (tests/test_gpu_quantization.py: bf16, 17 / 300 / 2048 rows). Half-precision rows only: fp32 rows would
# run its tl.dot in full fp32 ("ieee"), which compiles for sm_90 to an FFMA loop spilling to local memory
# (sass_count.py: ~1,360 local stores against none in bf16), not measured: fp32 keeps the dequantized weight and cuBLAS.
BLOCK_FP8_GEMM = True
BLOCK_FP8_GEMM_MAX_ROWS = 128
# Where the weight is dequantized for cuBLAS (past BLOCK_FP8_GEMM_MAX_ROWS, fp32 rows): one kernel
# (kernels/fp8_block_dequantize.py: a byte read and the dtype's bytes written a weight) instead of PyTorch's three
# passes (~19 bytes a weight). Measured on an H200 (2026-12-02, bench_quant_gemv --prefill,
# W5-quant-gemv-nvidia-h200-20261202-blockfp8-prefill.json; kernel + cuBLAS against PyTorch's dequantization +
# cuBLAS, the four projections): 323 against 1824 us at 128 rows, 1471 against 2831 at 2048 (cuBLAS on bf16 weights
# 138 / 1331). GPU-tested the same day (tests/test_gpu_quantization.py -k block: 31 passed).
BLOCK_FP8_DEQUANT_KERNEL = True


@triton.jit
def _fp8_block_gemm_kernel(
    X,  # [M, K], row stride stride_xm, unit column stride
    W,  # [N, K] float8 e4m3, row stride stride_wn, unit column stride
    S,  # [N / SCALE_ROWS, K / SCALE_COLS] fp32 block multipliers, row stride stride_sn, unit column stride
    B,  # [N] bias (read only with HAS_BIAS)
    Y,  # [M, N], row stride stride_ym
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_ym,
    SCALE_ROWS: tl.constexpr,  # the block's rows of W
    SCALE_COLS: tl.constexpr,  # the block's columns of W (BLOCK_K divides them: a K step lies in one block column)
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """Program (tile) of y = x @ W^T + bias with W's [BLOCK_N, BLOCK_K] tiles dequantized in the K loop: code x its
    block's multiplier in fp32, rounded to x's dtype, the weight cuBLAS read before (dequantize_blocks(..., x.dtype)).
    The blocks tile W (the launcher checks), so K is a multiple of BLOCK_K: no K masks."""
    m, n = _gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    n_load = tl.minimum(n, N - 1).to(tl.int64)  # rows past M and N clamped on load, masked on store
    x_ptrs = X + tl.minimum(m, M - 1).to(tl.int64)[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    w_ptrs = W + n_load[:, None] * stride_wn + tl.arange(0, BLOCK_K)[None, :]
    s_ptrs = S + (n_load // SCALE_ROWS) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        scale = tl.load(s_ptrs + k0 // SCALE_COLS)
        w = (tl.load(w_ptrs + k0).to(tl.float32) * scale[:, None]).to(X.dtype.element_ty)
        acc = tl.dot(tl.load(x_ptrs + k0), tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    mask = (m < M)[:, None] & (n < N)[None, :]
    tl.store(Y + m.to(tl.int64)[:, None] * stride_ym + n[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def _fp8_block_gemm(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """rows [M, K] @ (qweight [N, K] x its block multipliers scale [N / bn, K / bk])^T + bias, M > 16; the blocks
    tile the weight and span a multiple of 16 columns (`_block_gemv_fits`). Tiles as the int4 GEMM's."""
    m, k = rows.shape
    n = qweight.shape[0]
    scale_rows, scale_cols = n // scale.shape[0], k // scale.shape[1]
    cfg = dict(_int4_gemm_config(m, n, 128, rows.device))
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], scale_cols & -scale_cols)  # a power of two dividing the block's columns
    out = torch.empty(m, n, dtype=rows.dtype, device=rows.device)
    rows, scale = rows.contiguous(), scale.contiguous()
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    with device_guard(rows):
        _fp8_block_gemm_kernel[grid](
            rows, qweight, scale, bias if bias is not None else out, out, m, n, k,
            rows.stride(0), qweight.stride(0), scale.stride(0), out.stride(0),
            SCALE_ROWS=scale_rows, SCALE_COLS=scale_cols, HAS_BIAS=bias is not None,
            DOT_PRECISION="ieee" if rows.dtype == torch.float32 else "tf32", **cfg,
        )  # fmt: skip
    return out


def int4_linear_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                    zeros: torch.Tensor | None = None, *, pdl: bool = True) -> torch.Tensor:
    """x [..., K], packed [N, K // 2] uint8, scales [N, K // group] fp32, zeros like scales or None (symmetric) ->
    [..., N] in x's dtype (fp32 math). pdl: accepted (and unused: a launch option) so that a graph's call keeps its
    arguments with the reference."""
    weight = dequantize_int4(packed, scales, zeros=zeros)
    return F.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)


def check_split_counters(split_counters: torch.Tensor | None, x: torch.Tensor) -> None:
    """int4 split counters: None, or int32 on x's device (ValueError otherwise)."""
    if split_counters is not None and (split_counters.dtype != torch.int32 or split_counters.device != x.device):
        raise ValueError(f"split_counters must be int32 on x's device {x.device}, got {split_counters.dtype} on "
                         f"{split_counters.device}")


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                zeros: torch.Tensor | None = None, *, split_counters: torch.Tensor | None = None,
                pdl: bool = True) -> torch.Tensor:
    """`int4_linear_ref`'s math in Triton (CUDA, or the CPU inside `triton_on_cpu()`): up to 16 rows the decode
    kernel, more the GEMM that dequantizes W's tiles in its K loop, from INT4_DEQUANT_MIN_ROWS the weight dequantized
    into x's dtype by a kernel and multiplied by F.linear; the CPU runs the reference. Groups other than a
    power of two from 32 up run the reference's dequantization (into x's dtype) and F.linear on CUDA.

    zeros: None (symmetric: 8), or whole numbers from 0 to 16 (what the quantizer and the GPTQ / AWQ loaders make):
    the bf16 decode loop (INT4_PACKED_BF16) holds 128 + zero exactly only for those. Values are not checked here (a
    check would synchronize every call); a fractional zero point would be rounded there.
    split_counters: None, or int32 zeros on x's device (at least N / 16 of them) that no concurrent call shares:
    the decode kernel then sums its K splits itself (the quantize pass gives each model's graph one such buffer).
    pdl: False launches the decode kernel without programmatic dependent launch (it starts once the kernel before
    it has ended), where overlapping that kernel measured slower (passes/int4_act_fusion.py)."""
    if not isinstance(pdl, bool):
        raise ValueError(f"pdl must be True or False, got {pdl!r}")
    n = packed.shape[0]
    k = packed.shape[1] * 2
    rows = x.reshape(-1, k)
    group = k // scales.shape[1] if scales.shape[1] else 0
    check_split_counters(split_counters, x)
    if use_triton(x) and rows.shape[0] > 0 and n > 0 and group >= 32 and group & (group - 1) == 0:
        if rows.shape[0] <= FP8_WEIGHT_ONLY_MAX_ROWS:
            return _int4_gemv(rows, packed, scales, bias, zeros, split_counters=split_counters, pdl=pdl).reshape(
                *x.shape[:-1], n)
        if rows.shape[0] >= INT4_DEQUANT_MIN_ROWS:
            return F.linear(x, _int4_dequantize(packed, scales, zeros, x.dtype), bias)
        return _int4_gemm(rows, packed, scales, bias, zeros).reshape(*x.shape[:-1], n)
    if not x.is_cuda:
        return int4_linear_ref(x, packed, scales, bias, zeros)
    return F.linear(x, dequantize_int4(packed, scales, x.dtype, zeros), bias)
