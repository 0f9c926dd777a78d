"""Decode linears that take in their neighbours: the skinny GEMM with an RMSNorm or a gated activation applied to x as
it reads it, and the residual add applied to its output.

    y = linear(prologue(x), weight, bias)           rounded to x's dtype
    y = y + residual                                rounded again (with `residual`)

    prologue "rms_norm":                  rms_norm(x, norm_weight, norm_eps, ...)     x: [..., K]
    prologue "silu" | "gelu" | "gelu_tanh": act(gate) * up                            x: [..., 2K] = [gate | up]

Why: at batch-1 decode a Llama layer was ~10 kernels, four of them (two norms with their residual adds, SiLU * up)
a few microseconds of work each, and every kernel boundary inside the CUDA graph costs about as much again. The
norm's weight, the activation and the add are elementwise on what the GEMV reads or writes, so the GEMV does them on
the way; only the norm's 1 / rms needs the whole row, which each program reads once (from L2 after the first one)
before its product. Every intermediate is rounded where the unfused kernels store it, so the values are theirs.

Quantized weights (`weight_scale`): an FP8 (e4m3) or int8 weight with one fp32 scale per output channel, as
`quantization="fp8" | "int8"` stores them. The skinny GEMM widens the one-byte weights as it reads them and scales its
output columns, so a prologue fuses into their decode GEMMs as into float ones; the unfused path runs the scheme's own
launcher (`fp8_linear`, `int8_linear`), and a block-scaled FP8 checkpoint's weight (2-D scales) always runs unfused.

More than 16 rows (prefill, large decode batches), a prologue on more than PROLOGUE_MAX_ROWS rows, or no Triton: the
unfused kernels in a row (the norm or the activation kernel, the skinny GEMM, cuBLAS or the quantized launcher, the
add), the same values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastllm.kernels import skinny_gemm
from fastllm.kernels._registry import (
    check_float,
    check_out,
    check_row_param,
    check_same_device,
    out_or_new,
    register_out_op,
    rows_view,
    use_triton,
)
from fastllm.kernels.gelu_and_mul import gelu_and_mul, gelu_and_mul_ref
from fastllm.kernels.quant_linear import fp8_linear, fp8_linear_ref, int8_linear, int8_linear_ref
from fastllm.kernels.rms_norm import rms_norm, rms_norm_ref
from fastllm.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from fastllm.kernels.skinny_gemm import skinny_linear

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
NORMS = ("rms_norm", "rms_norm_deferred")
# The deferred RMSNorm without its weight: the caller folded the norm's weight into W's columns (W * w), so the
# product reads x itself (skinny_gemm's prologue of that name); its unfused form is the RMSNorm without a weight (ones).
SCALES = ("rms_scale_deferred",)
PROLOGUES = (*NORMS, *SCALES, *ACTIVATIONS)
# A prologue runs inside the GEMM for a single row only. Every program recomputes the prologue for its rows of W, which
# pays only at 1 row (H200, 2026-11-30, W5-fused-linear, a Llama-3.1-8B layer's decode GEMMs: SiLU * up inside
# down_proj 29.4 us against 36.6 unfused at 1 row, 64-68 against 37.9 at 2 rows; at 8 rows, the tl.dot form, the
# layer took 236 us fused against 139). Past it the prologue's own kernel runs first and then the skinny GEMM.
PROLOGUE_MAX_ROWS = 1
# Rows of W a program takes with the deferred RMSNorm (None: the plain GEMV's), benchmarks sweep it
DEFERRED_NORM_BLOCK_N: int | None = None
# The gated activation's launch settings at one row where they differ from skinny_gemm's prologue heuristic (None: its
# choice): rows of W a program, columns a chunk, chunks in flight + 1, K splits. benchmarks/bench_act_down.py sweeps
# them (the down projection after the gate-up GEMV, inside CUDA graphs).
ACT_PROLOGUE_BLOCK_N: int | None = None
ACT_PROLOGUE_BLOCK_K: int | None = None
ACT_PROLOGUE_STAGES: int | None = None
ACT_PROLOGUE_SPLIT_K: int | None = None
# One-byte weights with a scale per output channel: their dtype -> (launcher, reference) of the unfused linear.
QUANTIZED_LINEARS = {torch.float8_e4m3fn: (fp8_linear, fp8_linear_ref), torch.int8: (int8_linear, int8_linear_ref)}


def _act_prologue_settings(cfg: dict) -> dict:
    """`cfg` (the broadcast form's) with the ACT_PROLOGUE_* settings that are set."""
    for key, value in (("BLOCK_N", ACT_PROLOGUE_BLOCK_N), ("BLOCK_K", ACT_PROLOGUE_BLOCK_K),
                       ("NUM_STAGES", ACT_PROLOGUE_STAGES), ("split_k", ACT_PROLOGUE_SPLIT_K)):
        if value is not None:
            cfg[key] = value
    return cfg


def _prologue(x, prologue, norm_weight, norm_eps, norm_offset, norm_cast, reference: bool) -> torch.Tensor:
    """What the unfused graph computes before the linear: the kernels (or, with `reference`, their references)."""
    if prologue in NORMS or prologue in SCALES:  # the deferred norm's unfused form is the norm kernel's (rounded as
        norm = rms_norm_ref if reference else rms_norm  # Hugging Face rounds)
        if prologue in SCALES:  # the norm without a weight (ones): h rounded to x's dtype, no weight to make
            norm_weight, norm_offset = None, 0.0
        return norm(x, norm_weight, norm_eps, weight_offset=norm_offset, cast_before_weight=norm_cast)
    if prologue == "silu":
        return silu_and_mul_ref(x) if reference else silu_and_mul(x)
    if prologue in ("gelu", "gelu_tanh"):
        approximate = "none" if prologue == "gelu" else "tanh"
        return (gelu_and_mul_ref if reference else gelu_and_mul)(x, approximate=approximate)
    return x


def fused_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     residual: torch.Tensor | None = None, prologue: str | None = None,
                     norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6, norm_offset: float = 0.0,
                     norm_cast_before_weight: bool = True,
                     weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch spec of `fused_linear`: the references of the kernels it fuses, one after the other."""
    h = _prologue(x, prologue, norm_weight, norm_eps, norm_offset, norm_cast_before_weight, True)
    if weight_scale is None:
        y = F.linear(h, weight, bias)
    else:
        y = QUANTIZED_LINEARS[weight.dtype][1](h, weight, weight_scale, bias)
    return y if residual is None else y + residual


def _unfused(x, weight, bias, residual, prologue, norm_weight, norm_eps, norm_offset, norm_cast,
             weight_scale) -> torch.Tensor:
    """The unfused kernels one after the other: the prologue's, the skinny GEMM (cuBLAS past 16 rows) or the
    quantized weight's launcher, the add."""
    h = _prologue(x, prologue, norm_weight, norm_eps, norm_offset, norm_cast, not use_triton(x))
    if weight_scale is None:
        y = skinny_linear(h, weight, bias)
    else:
        y = QUANTIZED_LINEARS[weight.dtype][0](h, weight, weight_scale, bias)
    return y if residual is None else y.add_(residual)


def _fusable(x: torch.Tensor, weight_scale: torch.Tensor | None, rows: int,
             prologue: str | None) -> bool:
    """Whether the skinny GEMM runs these rows with the prologue inside: Triton on x's device, few enough rows, and
    a float weight or a one-byte one with per-channel scales."""
    # The folded norm adds only x^2 to a chunk (no pass over x first, nothing recomputed per rows of W): every row
    # the skinny GEMM takes
    if not use_triton(x) or rows > (skinny_gemm.MAX_SKINNY_M if prologue is None or prologue in SCALES
                                    else PROLOGUE_MAX_ROWS):
        return False
    return weight_scale is None or weight_scale.dim() == 1


@register_out_op("fused_linear", mutates_args=("out",))
def _fused_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    out: torch.Tensor,
    prologue: str,
    norm_eps: float,
    norm_offset: float,
    norm_cast: bool,
) -> None:
    """Op form on row views; prologue "none" for none."""
    prologue = None if prologue == "none" else prologue
    m = x.shape[0]
    n, k = weight.shape
    if _fusable(x, weight_scale, m, prologue):
        deferred = prologue in skinny_gemm.DEFERRED_PROLOGUES
        # The deferred norm adds little to a chunk (a product and a square a column): the plain GEMV's tiles, one
        # K split (each program's sum of x^2 must cover the row)
        cfg = skinny_gemm._config(m, n, k, x.dtype, x.device, weight_bytes=weight.element_size(),
                                  prologue=prologue is not None and not deferred)
        if deferred:
            cfg["split_k"] = 1
            if DEFERRED_NORM_BLOCK_N and not cfg["USE_DOT"]:  # more rows of W a program, the same bytes a chunk
                cfg["BLOCK_K"] = max(16, cfg["BLOCK_K"] * cfg["BLOCK_N"] // DEFERRED_NORM_BLOCK_N)
                cfg["BLOCK_N"] = DEFERRED_NORM_BLOCK_N
        elif prologue in ACTIVATIONS and not cfg["USE_DOT"]:
            cfg = _act_prologue_settings(cfg)
        norm = (norm_weight, norm_eps, norm_offset, norm_cast) if prologue in NORMS else None
        if prologue in SCALES:
            norm = (x, norm_eps, 0.0, True)  # only eps is read
        skinny_gemm._launch(x, weight, bias, out, None, cfg, weight_scale=weight_scale, residual=residual,
                            prologue=prologue, norm=norm)
    else:
        out.copy_(_unfused(x, weight, bias, residual, prologue, norm_weight, norm_eps, norm_offset, norm_cast,
                           weight_scale))


def _check_quantized(x, weight, weight_scale, bias) -> None:
    """A one-byte weight [N, K] (QUANTIZED_LINEARS) with fp32 scales: [N] per output channel, or an FP8
    checkpoint's 2-D block scales; bias in x's dtype."""
    check_float("x", x)
    check_same_device("weight", weight, "x", x)
    check_same_device("weight_scale", weight_scale, "x", x)
    if weight.dtype not in QUANTIZED_LINEARS:
        raise TypeError(f"a weight with weight_scale must be one of {sorted(map(str, QUANTIZED_LINEARS))}, got "
                        f"{weight.dtype}")
    if weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [N, {x.shape[-1]}] (x's last dim), got shape {tuple(weight.shape)}")
    if weight_scale.dtype != torch.float32:
        raise TypeError(f"weight_scale must be float32, got {weight_scale.dtype}")
    per_channel = weight_scale.shape == weight.shape[:1]
    if not per_channel and not (weight_scale.dim() == 2 and weight.dtype == torch.float8_e4m3fn):
        raise ValueError(f"weight_scale must be [{weight.shape[0]}] (a scale per output channel) or an FP8 weight's "
                         f"2-D block scales, got shape {tuple(weight_scale.shape)}")
    if bias is not None:
        check_float("bias", bias)
        check_same_device("bias", bias, "x", x)
        if bias.shape != weight.shape[:1] or bias.dtype != x.dtype:
            raise ValueError(f"bias must be ({weight.shape[0]},) of x's dtype {x.dtype}, got {tuple(bias.shape)} "
                             f"{bias.dtype}")


def _check(x, weight, bias, residual, prologue, norm_weight, norm_eps, norm_offset, norm_cast, weight_scale) -> None:
    x_in = x[..., :weight.shape[1]] if prologue in ACTIVATIONS else x
    if weight_scale is None:
        skinny_gemm._check_inputs(x_in, weight, bias)
    else:
        _check_quantized(x_in, weight, weight_scale, bias)
    if prologue is not None and prologue not in PROLOGUES:
        raise ValueError(f"prologue must be None or one of {PROLOGUES}, got {prologue!r}")
    k = weight.shape[1]
    if prologue in ACTIVATIONS and x.shape[-1] != 2 * k:
        raise ValueError(f"a gated activation reads x = [gate | up]: x's last dim must be 2 * {k}, got {x.shape[-1]}")
    if prologue in SCALES and norm_weight is not None:
        raise ValueError(f"prologue {prologue!r} takes no norm_weight (it is folded into weight); use "
                         "'rms_norm_deferred' to pass it")
    if prologue in NORMS or prologue in SCALES:
        if prologue in NORMS:
            if norm_weight is None:
                raise ValueError(f"prologue {prologue!r} needs norm_weight")
            check_row_param("norm_weight", norm_weight, x)
            out_dtype = torch.promote_types(x.dtype, norm_weight.dtype) if norm_cast else x.dtype
            if out_dtype != x.dtype:
                raise TypeError(f"the norm's output ({out_dtype}) must have x's dtype {x.dtype} to feed the linear")
        for name, value in (("norm_eps", norm_eps), ("norm_offset", norm_offset)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if norm_eps < 0:
            raise ValueError(f"norm_eps must be >= 0, got {norm_eps!r}")
    if residual is not None:
        check_float("residual", residual)
        check_same_device("residual", residual, "x", x)
        if residual.shape != (*x.shape[:-1], weight.shape[0]) or residual.dtype != x.dtype:
            raise ValueError(f"residual must be {(*x.shape[:-1], weight.shape[0])} of x's dtype {x.dtype}, got "
                             f"{tuple(residual.shape)} {residual.dtype}")


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    prologue: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    norm_offset: float = 0.0,
    norm_cast_before_weight: bool = True,
    weight_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`linear(prologue(x), weight, bias) (+ residual)`, fused into the skinny GEMM for up to 16 rows.

    Args:
        x: [..., K] (prologue None or a norm) or [..., 2K] (a gated activation: [gate | up]), 16- or 32-bit
            float, last dim contiguous.
        weight: [N, K] of x's dtype, or float8 e4m3 / int8 with `weight_scale`; bias: optional [N] of x's dtype.
        residual: optional [..., N] of x's dtype, added to the rounded output (the residual stream).
        prologue: None, "rms_norm", "rms_norm_deferred", "rms_scale_deferred", or a gated activation: "silu",
            "gelu", "gelu_tanh". "rms_norm_deferred" (one row, Triton): the product reads x * norm weight in fp32 and
            the rows' 1 / rms scales it after the loop (no pass over x before it, nothing rounded before the output);
            elsewhere it is "rms_norm". "rms_scale_deferred": the same without norm_weight (None), which the caller
            folded into `weight` (weight * norm_weight[None, :]); elsewhere "rms_norm" without a weight (ones).
        norm_weight, norm_eps, norm_offset, norm_cast_before_weight: the RMSNorm's (kernels.rms_norm's weight, eps,
            weight_offset, cast_before_weight); its output dtype must be x's.
        weight_scale: for a quantized weight, [N] fp32 (y = linear(x, weight * weight_scale[:, None]) as
            fp8_linear / int8_linear compute it), or an FP8 checkpoint's 2-D block scales (never fused).
        out: optional [..., N] buffer of x's dtype.
    Returns:
        out, [..., N].
    """
    check_float("x", x)
    _check(x, weight, bias, residual, prologue, norm_weight, norm_eps, norm_offset, norm_cast_before_weight,
           weight_scale)
    shape = (*x.shape[:-1], weight.shape[0])
    if out is not None:
        check_out("out", out, shape, x.dtype, x.device)
    if math.prod(x.shape[:-1]) > skinny_gemm.MAX_SKINNY_M or not use_triton(x):
        # Prefill, large batches, the CPU: the unfused kernels (or references) one after the other, no op dispatch
        # and no copy of the output (prefill's outputs are large)
        y = _unfused(x, weight, bias, residual, prologue, norm_weight, norm_eps, norm_offset, norm_cast_before_weight,
                     weight_scale)
        return y if out is None else out.copy_(y)
    out = out_or_new("out", out, shape, x.dtype, x.device)
    _fused_linear_op(rows_view("x", x), weight, bias, None if residual is None else rows_view("residual", residual),
                     norm_weight, weight_scale, rows_view("out", out, writable=True), prologue or "none",
                     float(norm_eps), float(norm_offset), bool(norm_cast_before_weight))
    return out


__all__ = ["ACTIVATIONS", "NORMS", "PROLOGUES", "SCALES", "QUANTIZED_LINEARS", "fused_linear", "fused_linear_ref"]
