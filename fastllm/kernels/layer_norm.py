"""LayerNorm over the last dim, and residual-add + LayerNorm (GPT-2, GPT-NeoX, Phi, Falcon, Bloom, ...).

    mean = sum(x) / N,   var = sum((x - mean)^2) / N             (in fp32, biased variance like torch)
    y = ((x - mean) * rsqrt(var + eps) * weight + bias).to(x.dtype)

`fused_add_layer_norm` normalises s = x + residual, rounded to x's dtype, and returns s too, by the rule of
`fused_add_rms_norm` (one helper, `_registry.load_row_plus_residual`, holds it for both kernels).
"""

from typing import Optional

import torch

from fastllm.kernels._registry import (
    check_float,
    check_number,
    check_row_param,
    device_guard,
    load_row_plus_residual,
    norm_outputs,
    pdl_options,
    pdl_wait,
    ref_output,
    register_out_op,
    row_launch_settings,
    rows_view,
    tl,
    triton,
    use_triton,
)


@triton.jit
def _layer_norm_kernel(
    X,  # [M, N], row stride stride_x
    R,  # [M, N] residual (read only if HAS_RESIDUAL)
    W,  # [N] (read only if HAS_WEIGHT)
    B,  # [N] (read only if HAS_BIAS)
    Y,  # [M, N] normalised output
    S,  # [M, N] x + residual, rounded to x's dtype (written only if HAS_RESIDUAL)
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """One program per row. Two-pass variance (mean first, then squared deviations) from registers: the
    one-pass E[x^2] - E[x]^2 loses most digits in fp32 when |mean| >> std, as after a residual add."""
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 at 16K rows of 128K
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < N
    x = load_row_plus_residual(X, R, S, row, stride_x, stride_r, stride_s, cols, mask, HAS_RESIDUAL, "")
    h = x.to(tl.float32)
    mean = tl.sum(h, axis=0) / N
    d = tl.where(mask, h - mean, 0.0)
    y = d * tl.rsqrt(tl.sum(d * d, axis=0) / N + eps)
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`torch.nn.functional.layer_norm` over the last dim (the spec of `layer_norm`)."""
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def fused_add_layer_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm_ref(x + residual), x + residual)."""
    s = x + residual
    return layer_norm_ref(s, weight, bias, eps), s


def _launch(x, residual, weight, bias, out, residual_out, eps):
    # x, residual, out, residual_out: [M, N] row views; residual/residual_out None for the plain norm.
    num_rows, n = x.shape
    if num_rows == 0:
        return
    block, num_warps = row_launch_settings(n)
    has_residual = residual is not None
    r = residual if has_residual else x
    s = residual_out if has_residual else out
    # Absent parameters are never read (HAS_WEIGHT/HAS_BIAS are constexpr); x stands in for the pointer.
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    with device_guard(x):
        _layer_norm_kernel[(num_rows,)](
            x, r, w, b, out, s,
            x.stride(0), r.stride(0), out.stride(0), s.stride(0),
            n, eps,
            HAS_RESIDUAL=has_residual, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_SIZE=block, num_warps=num_warps, **pdl_options(x),
        )  # fmt: skip


# `Optional` rather than `X | None`: torch.library reads these annotations to build the op schema.
@register_out_op("layer_norm", mutates_args=("out",))
def _layer_norm_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], out: torch.Tensor, eps: float
) -> None:
    if use_triton(x):
        _launch(x, None, weight, bias, out, None, eps)
    else:
        out.copy_(layer_norm_ref(x, weight, bias, eps))


@register_out_op("fused_add_layer_norm", mutates_args=("out", "residual_out"))
def _fused_add_layer_norm_op(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    out: torch.Tensor,
    residual_out: torch.Tensor,
    eps: float,
) -> None:
    if use_triton(x):
        _launch(x, residual, weight, bias, out, residual_out, eps)
    else:
        y, s = fused_add_layer_norm_ref(x, residual, weight, bias, eps)
        residual_out.copy_(s)
        out.copy_(y)


def _check_params(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    # x's dtype only: torch's CUDA layer_norm rejects fp32 parameters for half inputs (its CPU one takes them).
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_row_param(name, p, x)
            if p.dtype != x.dtype:
                raise TypeError(f"{name} has dtype {p.dtype}; it must have x's dtype ({x.dtype})")


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim of `x`; see the module docstring for the math.

    Args:
        x: [..., N], float32/float16/bfloat16, last dim contiguous, N <= 65536.
        weight, bias: [N] or None, of x's dtype, on x's device.
        eps: added to the variance.
        out: optional [..., N] buffer of x's dtype.
    Returns:
        out, [..., N].
    """
    check_float("x", x)
    check_number("eps", eps)
    _check_params(x, weight, bias)
    if out is None and not use_triton(x):  # the CPU path: the reference itself, no buffer nor op dispatch
        norm_outputs(x, None, x.dtype, None, None, allocate=False)  # the checks only
        return ref_output(layer_norm_ref(x, weight, bias, eps), x.dtype, x)
    out, _ = norm_outputs(x, None, x.dtype, out, None)
    _layer_norm_op(rows_view("x", x), weight, bias, rows_view("out", out, writable=True), float(eps))
    return out


def fused_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual (rounded to x.dtype), then `layer_norm(s, ...)`, in one pass over memory.

    Args:
        x, residual: [..., N], same shape and dtype.
        weight, bias, eps, out: as for `layer_norm`.
        residual_out: optional [..., N] buffer of x's dtype for s.
    Returns:
        (out, residual_out): the normalised s and s itself (the next layer's residual).
    """
    check_float("x", x)
    check_number("eps", eps)
    _check_params(x, weight, bias)
    if out is None and residual_out is None and not use_triton(x):  # the CPU path (see layer_norm)
        norm_outputs(x, residual, x.dtype, None, None, allocate=False)  # the checks only
        y, s = fused_add_layer_norm_ref(x, residual, weight, bias, eps)
        return ref_output(y, x.dtype, x), ref_output(s, x.dtype, x)
    out, residual_out = norm_outputs(x, residual, x.dtype, out, residual_out)
    _fused_add_layer_norm_op(
        rows_view("x", x),
        rows_view("residual", residual),
        weight,
        bias,
        rows_view("out", out, writable=True),
        rows_view("residual_out", residual_out, writable=True),
        float(eps),
    )
    return out, residual_out
