"""Quantized linears: y = x @ W^T + b with W stored quantized (formats in `fastllm/quant/`).

- `fp8_linear`: FP8 weights (e4m3, one scale per output channel, quantized once). Steps of up to 16 rows (decode)
  keep the activations in the model's dtype and read the FP8 weights in the skinny GEMM (the weight's bytes are the
  cost there); larger ones quantize x per token (row) on the fly (one Triton kernel, `quantize_rows_fp8`) and run
  cuBLAS's FP8 tensor-core GEMM (`torch._scaled_mm`, row-wise scales: the fp32 accumulator times x_scale[m] *
  w_scale[n]). Shapes that GEMM does not take (K or N not a multiple of 16) and CPU tensors run the reference.
- `int8_linear`, `int4_linear`: weight-only. Up to 16 rows (decode) a Triton kernel reads the quantized weights: the
  skinny GEMM for int8 (as for fp8), a GEMV over the packed nibbles for int4. More rows on CUDA dequantize the weight
  into x's dtype on each call for cuBLAS (prefill: the GEMM's compute hides it less well; a fused kernel is to come).
  The references dequantize and multiply in fp32.

The references define the math the GPU paths are checked against (by SQNR: the GPU accumulates in another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllm.kernels import skinny_gemm
from fastllm.kernels._registry import device_guard, row_launch_settings, tl, triton, use_triton
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
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.where(amax > 0, tl.fdiv(amax, FP8_MAX, ieee_rounding=True), 1.0)
    q = tl.fdiv(x, scale, ieee_rounding=True)
    q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
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
    to e4m3 too, the product in fp32 scaled by x_scale[m] * w_scale[n]."""
    if x.numel() // max(x.shape[-1], 1) <= FP8_WEIGHT_ONLY_MAX_ROWS:
        y = x.float() @ (qweight.float() * weight_scale[:, None]).t()
    else:
        xq, x_scale = fp8_format.quantize_rows(x)
        y = (xq.float() @ qweight.float().t()) * x_scale * weight_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """`fp8_linear_ref`'s math; on CUDA the skinny GEMM reading FP8 weights (few rows), else an FP8 tensor-core GEMM."""
    n, k = qweight.shape
    rows = x.reshape(-1, k)
    if use_triton(x) and 0 < rows.shape[0] <= FP8_WEIGHT_ONLY_MAX_ROWS:
        return _weight_gemv(rows, qweight, weight_scale, bias).reshape(*x.shape[:-1], n)
    if not x.is_cuda or k % 16 or n % 16:
        return fp8_linear_ref(x, qweight, weight_scale, bias)
    xq, x_scale = quantize_rows_fp8(rows)
    y = torch._scaled_mm(xq, qweight.t(), scale_a=x_scale, scale_b=weight_scale[None, :], bias=bias,
                         out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], n)


def _weight_gemv(rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """rows [M <= 16, K] @ (qweight [N, K] * scale[:, None])^T + bias through the skinny GEMM, which widens the 1-byte
    weights (float8 or int8) as it reads them and scales each output column in its epilogue."""
    m, k = rows.shape
    n = qweight.shape[0]
    out = torch.empty(m, n, dtype=rows.dtype, device=rows.device)
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


@triton.jit
def _int4_gemv_kernel(
    X,  # [M, K], row stride stride_xm, unit column stride
    W,  # [N, K // 2] uint8: column 2j in the low nibble of byte j, 2j + 1 in the high one; codes + 8
    S,  # [N, K // GROUP] fp32 scales, row stride stride_sn
    Z,  # [N, K // GROUP] fp32 zero points, like S (read only with HAS_ZEROS; else the zero is 8)
    B,  # [N] bias (read only with HAS_BIAS)
    Y,  # [M, N], row stride stride_ym
    N, K,
    stride_xm, stride_wn, stride_sn, stride_ym,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KH: tl.constexpr,  # packed bytes a chunk; 2 * BLOCK_KH divides GROUP, so a chunk has one scale
):  # fmt: skip
    """Program (n block, row m): y[m, n] = sum_k x[m, k] * ((nibble[n, k] - zero) * scale[n, k // GROUP]), the zero 8
    (symmetric) or the group's own (HAS_ZEROS). Even and odd columns of
    x are loaded apart and meet the low and high nibbles, so the packed bytes are never interleaved in registers; the
    [BLOCK_N, BLOCK_KH] accumulator is reduced once, after the loop."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_load = tl.minimum(n, N - 1).to(tl.int64)  # rows past N re-read row N - 1 and are never stored
    j = tl.arange(0, BLOCK_KH)
    acc = tl.zeros([BLOCK_N, BLOCK_KH], dtype=tl.float32)
    for kh0 in range(0, K // 2, BLOCK_KH):
        packed = tl.load(W + n_load[:, None] * stride_wn + (kh0 + j)[None, :]).to(tl.int32)
        group = (2 * kh0) // GROUP
        if HAS_ZEROS:
            zero = tl.load(Z + n_load * stride_sn + group)[:, None]
        else:
            zero = 8.0
        low = (packed & 15).to(tl.float32) - zero
        high = (packed >> 4).to(tl.float32) - zero
        x_even = tl.load(X + m * stride_xm + 2 * (kh0 + j)).to(tl.float32)
        x_odd = tl.load(X + m * stride_xm + 2 * (kh0 + j) + 1).to(tl.float32)
        scale = tl.load(S + n_load * stride_sn + group)
        acc += (low * x_even[None, :] + high * x_odd[None, :]) * scale[:, None]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(Y + m * stride_ym + n, y.to(Y.dtype.element_ty), mask=n < N)


def _int4_gemv(rows: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
               zeros: torch.Tensor | None):
    m, k = rows.shape
    n = packed.shape[0]
    group = k // scales.shape[1]
    out = torch.empty(m, n, dtype=rows.dtype, device=rows.device)
    block_kh = min(64, group // 2)
    block_n = 16  # 256 programs a row for N = 4096: enough to fill an H100/H200 without split-K
    rows = rows.contiguous()
    with device_guard(rows):
        _int4_gemv_kernel[(triton.cdiv(n, block_n), m)](
            rows, packed, scales, zeros if zeros is not None else scales, bias if bias is not None else out, out, n, k,
            rows.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
            GROUP=group, HAS_BIAS=bias is not None, HAS_ZEROS=zeros is not None, BLOCK_N=block_n, BLOCK_KH=block_kh,
            num_warps=4,
        )  # fmt: skip
    return out


def int4_linear_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                    zeros: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K], packed [N, K // 2] uint8, scales [N, K // group] fp32, zeros like scales or None (symmetric) ->
    [..., N] in x's dtype (fp32 math)."""
    weight = dequantize_int4(packed, scales, zeros=zeros)
    return F.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                zeros: torch.Tensor | None = None) -> torch.Tensor:
    """`int4_linear_ref`'s math: up to 16 rows a Triton GEMV reads the packed weights (one program per row and block
    of outputs); more rows on CUDA dequantize into x's dtype for cuBLAS; the CPU runs the reference."""
    n = packed.shape[0]
    k = packed.shape[1] * 2
    rows = x.reshape(-1, k)
    if use_triton(x) and 0 < rows.shape[0] <= FP8_WEIGHT_ONLY_MAX_ROWS:
        return _int4_gemv(rows, packed, scales, bias, zeros).reshape(*x.shape[:-1], n)
    if not x.is_cuda:
        return int4_linear_ref(x, packed, scales, bias, zeros)
    return F.linear(x, dequantize_int4(packed, scales, x.dtype, zeros), bias)
