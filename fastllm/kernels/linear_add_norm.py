"""A decode linear whose output joins the residual stream and is RMS-normalised at once, in one launch:

    y      = linear(prologue(x), weight, bias)          rounded to x's dtype (kernels.fused_linear's y)
    normed, summed = fused_add_rms_norm(y, residual, norm_weight, eps, ...)

Why: a Llama layer's decode step runs `o_proj` then the residual add + RMSNorm kernel, and `down_proj` then another;
each norm is a few microseconds of work and a kernel boundary in the decode CUDA graph. Here the skinny GEMM's
programs store y, count themselves in on an int32 counter (zero on entry and exit), and the last one to arrive adds
the residual and normalises the whole output (`rms_norm.add_rms_norm_rows`), as the decode attention's last split
merges the others (kernels/paged_attention.py). y never leaves L2.

The values: y is the skinny GEMM's, stored in x's dtype; the add and the norm are `fused_add_rms_norm`'s operations,
but the sum of squares is taken in another order (chunks of the row, the GEMV's warps), so `normed` may differ from
the unfused kernels' in the last bit. Where the launch does not apply (more rows than the GEMV takes a prologue or
16, a split K, block-scaled weights, no Triton) the unfused kernels run one after the other: the same values as
before this fusion.
"""

from __future__ import annotations

import math

import torch

from fastllm.kernels import skinny_gemm
from fastllm.kernels._registry import (
    check_float,
    check_row_param,
    check_same_device,
    norm_outputs,
    register_out_op,
    rows_view,
    use_triton,
)
from fastllm.kernels.fused_linear import PROLOGUE_MAX_ROWS, _check, _unfused, fused_linear_ref
from fastllm.kernels.rms_norm import _out_dtype, fused_add_rms_norm, fused_add_rms_norm_ref

PROLOGUES = ("silu", "gelu", "gelu_tanh")  # the gated activations a down projection reads (decode_act_fusion)


def linear_add_rms_norm_ref(x, weight, bias, residual, norm_weight, eps, *, counter=None, weight_offset=0.0,
                            cast_before_weight=True, prologue=None, weight_scale=None):  # fmt: skip
    """Plain-PyTorch spec: the references of the linear (with its prologue) and of fused_add_rms_norm in a row
    (`counter`, the launch's, is not read)."""
    y = fused_linear_ref(x, weight, bias, prologue=prologue, weight_scale=weight_scale)
    return fused_add_rms_norm_ref(y, residual, norm_weight, eps, weight_offset=weight_offset,
                                  cast_before_weight=cast_before_weight)


def _one_launch(x: torch.Tensor, weight: torch.Tensor, weight_scale, prologue) -> dict | None:
    """The skinny GEMM's launch settings where it runs these rows [M, K] and normalises its output itself, else None
    (the unfused kernels run)."""
    rows = x.shape[0]
    if not use_triton(x) or rows == 0 or rows > (skinny_gemm.MAX_SKINNY_M if prologue is None else PROLOGUE_MAX_ROWS):
        return None
    if weight_scale is not None and weight_scale.dim() != 1:
        return None
    n, k = weight.shape
    cfg = skinny_gemm._config(rows, n, k, x.dtype, x.device, weight_bytes=weight.element_size(),
                              prologue=prologue is not None)
    num_splits, _ = skinny_gemm._split(k, cfg["BLOCK_K"], cfg["split_k"])
    return cfg if num_splits == 1 else None


@register_out_op("linear_add_rms_norm", mutates_args=("out", "residual_out", "counter"))
def _linear_add_rms_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    counter: torch.Tensor,
    out: torch.Tensor,
    residual_out: torch.Tensor,
    prologue: str,
    eps: float,
    weight_offset: float,
    cast_before_weight: bool,
) -> None:
    """Op form on row views; prologue "none" for none."""
    prologue = None if prologue == "none" else prologue
    cfg = _one_launch(x, weight, weight_scale, prologue)
    if cfg is not None:
        y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)  # read by the last program
        skinny_gemm._launch(x, weight, bias, y, None, cfg, weight_scale=weight_scale, prologue=prologue,
                            norm_after=(residual, norm_weight, out, residual_out, eps, weight_offset,
                                        cast_before_weight, counter))
        return
    y = _unfused(x, weight, bias, None, prologue, None, 1e-6, 0.0, True, weight_scale)
    fused_add_rms_norm(y, residual, norm_weight, eps, weight_offset=weight_offset,
                       cast_before_weight=cast_before_weight, out=out, residual_out=residual_out)


def _check_counter(counter: object, x: torch.Tensor) -> None:
    if not isinstance(counter, torch.Tensor):
        raise TypeError(f"counter must be a torch.Tensor, got {type(counter).__name__}")
    if counter.dtype != torch.int32 or counter.numel() < 1:
        raise ValueError(f"counter must be an int32 tensor of at least one element, got {counter.dtype} with "
                         f"{counter.numel()} elements")
    check_same_device("counter", counter, "x", x)


def linear_add_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    *,
    counter: torch.Tensor,
    weight_offset: float = 0.0,
    cast_before_weight: bool = True,
    prologue: str | None = None,
    weight_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_add_rms_norm(linear(prologue(x), weight, bias), residual, norm_weight, eps, ...)` in one launch for
    decode rows (see the module docstring).

    Args:
        x: [..., K] (or [..., 2K] with a gated-activation prologue), 16- or 32-bit float, last dim contiguous.
        weight, bias, weight_scale, prologue: as for `kernels.fused_linear` (prologue None or one of PROLOGUES).
        residual: [..., N] of x's dtype, added to the linear's rounded output.
        norm_weight, eps, weight_offset, cast_before_weight: as for `kernels.fused_add_rms_norm`.
        counter: a zeroed int32 tensor on x's device (one element read), left zero: the launch counts its programs
            on it. One counter serves every call on a stream (kernels run in order); not two concurrent calls.
    Returns:
        (normed, summed): the norm's output and linear(...) + residual (the next residual), [..., N].
    """
    check_float("x", x)
    if prologue is not None and prologue not in PROLOGUES:
        raise ValueError(f"prologue must be None or one of {PROLOGUES}, got {prologue!r}")
    _check(x, weight, bias, residual, prologue, None, 1e-6, 0.0, True, weight_scale)
    check_row_param("norm_weight", norm_weight, residual)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, (int, float)) \
            or not math.isfinite(weight_offset):
        raise ValueError(f"weight_offset must be a finite number, got {weight_offset!r}")
    _check_counter(counter, x)
    if math.prod(x.shape[:-1]) > skinny_gemm.MAX_SKINNY_M or not use_triton(x):
        # Prefill, large batches, the CPU: the unfused kernels (or references), no op dispatch
        y = _unfused(x, weight, bias, None, prologue, None, 1e-6, 0.0, True, weight_scale)
        return fused_add_rms_norm(y, residual, norm_weight, eps, weight_offset=weight_offset,
                                  cast_before_weight=cast_before_weight)
    out, residual_out = norm_outputs(residual, residual, _out_dtype(residual, norm_weight, cast_before_weight),
                                     None, None)
    _linear_add_rms_norm_op(rows_view("x", x), weight, bias, weight_scale, rows_view("residual", residual),
                            norm_weight, counter, rows_view("out", out, writable=True),
                            rows_view("residual_out", residual_out, writable=True), prologue or "none", float(eps),
                            float(weight_offset), bool(cast_before_weight))
    return out, residual_out


__all__ = ["PROLOGUES", "linear_add_rms_norm", "linear_add_rms_norm_ref"]
