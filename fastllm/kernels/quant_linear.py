"""Quantized linears: y = x @ W^T + b with W stored quantized (formats in `fastllm/quant/`).

- `fp8_linear`: FP8 weights (e4m3, one scale per output channel, quantized once). Steps of up to 16 rows (decode)
  keep the activations in the model's dtype and read the FP8 weights in the skinny GEMM (the weight's bytes are the
  cost there); larger ones quantize x per token (row) on the fly (one Triton kernel, `quantize_rows_fp8`) and run
  cuBLAS's FP8 tensor-core GEMM (`torch._scaled_mm`, row-wise scales: the fp32 accumulator times x_scale[m] *
  w_scale[n]). Shapes that GEMM does not take (K or N not a multiple of 16) and CPU tensors run the reference.
- `int8_linear`, `int4_linear`: weight-only. The reference dequantizes and multiplies in fp32. On CUDA the weight is
  dequantized into x's dtype on each call and multiplied by cuBLAS: correct, but it reads the weight twice; GEMV
  kernels that read the packed weight directly are still to come (issue 12).

The references define the math the GPU paths are checked against (by SQNR: the GPU accumulates in another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllm.kernels import skinny_gemm
from fastllm.kernels._registry import device_guard, row_launch_settings, tl, triton
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
    if x.is_cuda and rows.shape[0] <= FP8_WEIGHT_ONLY_MAX_ROWS and rows.shape[0] > 0:
        out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
        cfg = skinny_gemm._config(rows.shape[0], n, k, x.dtype, x.device)
        skinny_gemm._launch(rows.contiguous(), qweight, bias, out, None, cfg, weight_scale=weight_scale)
        return out.reshape(*x.shape[:-1], n)
    if not x.is_cuda or k % 16 or n % 16:
        return fp8_linear_ref(x, qweight, weight_scale, bias)
    xq, x_scale = quantize_rows_fp8(rows)
    y = torch._scaled_mm(xq, qweight.t(), scale_a=x_scale, scale_b=weight_scale[None, :], bias=bias,
                         out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], n)


def int8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K], qweight [N, K] int8, scale [N] fp32 -> [..., N] in x's dtype (fp32 math)."""
    return F.linear(x.float(), dequantize_int8(qweight, scale), None if bias is None else bias.float()).to(x.dtype)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    if not x.is_cuda:
        return int8_linear_ref(x, qweight, scale, bias)
    return F.linear(x, dequantize_int8(qweight, scale, x.dtype), bias)


def int4_linear_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K], packed [N, K // 2] uint8, scales [N, K // group] fp32 -> [..., N] in x's dtype (fp32 math)."""
    return F.linear(x.float(), dequantize_int4(packed, scales), None if bias is None else bias.float()).to(x.dtype)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    if not x.is_cuda:
        return int4_linear_ref(x, packed, scales, bias)
    return F.linear(x, dequantize_int4(packed, scales, x.dtype), bias)
