"""Quantized linears: y = x @ W^T + b with W stored quantized (formats in `fastllm/quant/`).

- `fp8_linear`: W8A8. x is quantized per token (row) to e4m3 on the fly, W per output channel once; the GEMM runs
  on FP8 tensor cores through cuBLAS (`torch._scaled_mm` with row-wise scales) and scales its fp32 accumulator by
  x_scale[m] * w_scale[n]. Shapes cuBLAS's FP8 GEMM does not take (K or N not a multiple of 16) and CPU tensors run
  the reference.
- `int8_linear`, `int4_linear`: weight-only. The reference dequantizes and multiplies in fp32. On CUDA the weight is
  dequantized into x's dtype on each call and multiplied by cuBLAS: correct, but it reads the weight twice; GEMV
  kernels that read the packed weight directly are still to come (issue 12).

The references define the math the GPU paths are checked against (by SQNR: the GPU accumulates in another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllm.quant import fp8 as fp8_format
from fastllm.quant.int_weight import dequantize_int4, dequantize_int8


def fp8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (float), qweight [N, K] e4m3, weight_scale [N] fp32 -> [..., N] in x's dtype."""
    xq, x_scale = fp8_format.quantize_rows(x)
    y = (xq.float() @ qweight.float().t()) * x_scale * weight_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """`fp8_linear_ref`'s math; on CUDA an FP8 tensor-core GEMM."""
    n, k = qweight.shape
    if not x.is_cuda or k % 16 or n % 16:
        return fp8_linear_ref(x, qweight, weight_scale, bias)
    rows = x.reshape(-1, k)
    xq, x_scale = fp8_format.quantize_rows(rows)
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
