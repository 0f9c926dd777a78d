"""An FP8 linear together with the kernel that makes its input, an RMSNorm (optionally after the residual add) or a
gated activation, as one launcher:

    y = fp8_linear(rms_norm(x), qweight, weight_scale, bias)                     (rms_norm_fp8_linear)
    y, s = fp8_linear(rms_norm(x + residual), ...), x + residual                 (... with a residual)
    y = fp8_linear(act(gate) * up, qweight, weight_scale, bias)                  (act_and_mul_fp8_linear)

Past FP8_WEIGHT_ONLY_MAX_ROWS rows `fp8_linear` quantizes its input per row (`quantize_rows_fp8`, a kernel that reads
the producer's output back) before the FP8 GEMM; here the producer's kernel writes the e4m3 codes and row scales
itself (`rms_norm_fp8_rows`, `act_and_mul_fp8_rows`): its 16-bit output is never stored, and one launch goes. The
codes and scales are the two kernels' own (the same arithmetic), so the GEMM's result is theirs bit for bit. Up to
16 rows (decode: the GEMV reads the 16-bit activations), off CUDA, for block-scaled weights or shapes the FP8 GEMM
does not take, the producer's and the linear's launchers run as they would unfused.
"""

from __future__ import annotations

import torch

from fastllm.kernels._act_and_mul import act_and_mul_fp8_rows, act_and_mul_out
from fastllm.kernels._registry import check_float, check_number, check_row_param, rows_view, use_triton
from fastllm.kernels.gelu_and_mul import gelu_and_mul, gelu_and_mul_ref
from fastllm.kernels.quant_linear import (
    FP8_WEIGHT_ONLY_MAX_ROWS,
    fp8_gemm,
    fp8_gemm_fits,
    fp8_linear,
    fp8_linear_ref,
)
from fastllm.kernels.rms_norm import (
    _out_dtype,
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_fp8_rows,
    rms_norm_ref,
)
from fastllm.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

# The gated activations: name -> (launcher, reference) of act(gate) * up.
ACTIVATIONS = {
    "silu": (silu_and_mul, silu_and_mul_ref),
    "gelu": (gelu_and_mul, gelu_and_mul_ref),
    "gelu_tanh": (lambda x: gelu_and_mul(x, approximate="tanh"), lambda x: gelu_and_mul_ref(x, approximate="tanh")),
}


def rms_norm_fp8_linear_ref(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, qweight: torch.Tensor,
                            weight_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                            residual: torch.Tensor | None = None, weight_offset: float = 0.0,
                            cast_before_weight: bool = True):  # fmt: skip
    """The spec: `rms_norm_ref` (`fused_add_rms_norm_ref` with a residual), then `fp8_linear_ref`."""
    norm = dict(weight_offset=weight_offset, cast_before_weight=cast_before_weight)
    if residual is None:
        return fp8_linear_ref(rms_norm_ref(x, norm_weight, eps, **norm), qweight, weight_scale, bias)
    normed, summed = fused_add_rms_norm_ref(x, residual, norm_weight, eps, **norm)
    return fp8_linear_ref(normed, qweight, weight_scale, bias), summed


def _fusable(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, k: int) -> bool:
    """Whether fp8_linear would quantize the producer's output ([..., k], made from x) for the FP8 GEMM."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (use_triton(x) and rows > FP8_WEIGHT_ONLY_MAX_ROWS and qweight.shape[1] == k
            and fp8_gemm_fits(x, qweight, weight_scale))  # fmt: skip


def rms_norm_fp8_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, qweight: torch.Tensor,
                        weight_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                        residual: torch.Tensor | None = None, weight_offset: float = 0.0,
                        cast_before_weight: bool = True):  # fmt: skip
    """`rms_norm_fp8_linear_ref`'s result (see the module docstring): y, or (y, x + residual) with a residual.

    Args:
        x, residual: [..., K] (as for `rms_norm` / `fused_add_rms_norm`, whose checks apply on the unfused path).
        norm_weight, eps, weight_offset, cast_before_weight: the norm's, as for `rms_norm`.
        qweight, weight_scale, bias: the FP8 linear's, as for `fp8_linear`.
    """
    norm = dict(weight_offset=weight_offset, cast_before_weight=cast_before_weight)
    if not (_fusable(x, qweight, weight_scale, x.shape[-1])
            and _out_dtype(x, norm_weight, cast_before_weight) in (x.dtype, torch.float32)):  # fmt: skip
        if residual is None:
            return fp8_linear(rms_norm(x, norm_weight, eps, **norm), qweight, weight_scale, bias)
        normed, summed = fused_add_rms_norm(x, residual, norm_weight, eps, **norm)
        return fp8_linear(normed, qweight, weight_scale, bias), summed
    check_float("x", x)
    check_row_param("weight", norm_weight, x)
    check_number("eps", eps)
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must have x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
                         f"{tuple(residual.shape)} and {residual.dtype}")  # fmt: skip
    k = x.shape[-1]
    codes, scales, summed = rms_norm_fp8_rows(rows_view("x", x).contiguous(), norm_weight, eps,
                                              residual=None if residual is None else
                                              rows_view("residual", residual).contiguous(), **norm)  # fmt: skip
    # fp8_linear's GEMM on what its quantize kernel would have made of the norm's output
    y = fp8_gemm(codes, scales, qweight, weight_scale, bias, _out_dtype(x, norm_weight, cast_before_weight))
    y = y.reshape(*x.shape[:-1], qweight.shape[0])
    return y if residual is None else (y, summed.reshape(*x.shape[:-1], k))


def act_and_mul_fp8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                               bias: torch.Tensor | None = None, *, activation: str = "silu") -> torch.Tensor:
    """The spec: the activation's reference (`silu_and_mul_ref`, `gelu_and_mul_ref`), then `fp8_linear_ref`."""
    return fp8_linear_ref(ACTIVATIONS[activation][1](x), qweight, weight_scale, bias)


def act_and_mul_fp8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: torch.Tensor | None = None, *, activation: str = "silu") -> torch.Tensor:
    """`act_and_mul_fp8_linear_ref`'s result (see the module docstring).

    Args:
        x: [..., 2I] = [gate | up], as for `silu_and_mul`; activation: "silu", "gelu" or "gelu_tanh".
        qweight, weight_scale, bias: the FP8 linear's ([N, I] weight), as for `fp8_linear`.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if not _fusable(x, qweight, weight_scale, x.shape[-1] // 2) or x.shape[-1] // 2 > 32768:
        return fp8_linear(ACTIVATIONS[activation][0](x), qweight, weight_scale, bias)
    act_and_mul_out(x, None, allocate=False)  # the activation's checks
    codes, scales = act_and_mul_fp8_rows(rows_view("x", x).contiguous(), activation)
    # fp8_linear's GEMM on what its quantize kernel would have made of the activation's output
    y = fp8_gemm(codes, scales, qweight, weight_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


__all__ = ["act_and_mul_fp8_linear", "act_and_mul_fp8_linear_ref", "rms_norm_fp8_linear", "rms_norm_fp8_linear_ref"]
