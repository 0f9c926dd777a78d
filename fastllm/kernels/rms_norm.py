"""RMSNorm and residual-add + RMSNorm, the norms of Llama, Mistral, Qwen (cast, then weight) and Gemma (weight in fp32).

    h = x * rsqrt(mean(x^2 over the last dim) + eps)            (in fp32)
    Llama: y = (weight + offset) * h.to(x.dtype)                (dtype: promote(x, weight))
    Gemma: y = (h * (offset + weight.float())).to(x.dtype)      (dtype: x.dtype; Gemma's offset is 1)

The fused form first adds the residual, s = x + residual, rounds s to its storage dtype (as Hugging Face stores
it before the norm), returns s as the new residual and normalises s.

`rms_norm` also takes no weight (None): a weight of ones, y = h rounded to x.dtype, without one to make and read. For
a norm whose weight was folded into the GEMM reading it (passes/decode_fusion.py): its unfused form past the skinny
GEMM's rows.
"""

import torch

from fastllm.kernels._registry import (
    check_float,
    check_number,
    check_row_param,
    device_guard,
    fp8_row_codes,
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
def _rms_norm_kernel(
    X,  # [M, N], row stride stride_x
    R,  # [M, N] residual (read only if HAS_RESIDUAL)
    W,  # [N] (read only if HAS_WEIGHT)
    Y,  # [M, N] normalised output (with QUANT_FP8: its float8 e4m3 codes)
    S,  # [M, N] x + residual, rounded to x's dtype (written only if HAS_RESIDUAL)
    QS,  # [M] fp32: with QUANT_FP8, each row's scale (y = codes x scale)
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    N,
    eps,
    weight_offset,
    HAS_RESIDUAL: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QUANT_FP8: tl.constexpr = False,  # store y quantized per row (quantize_rows_fp8's math), not y
    ROUND_TO_X: tl.constexpr = False,  # with QUANT_FP8: y is first rounded to x's dtype (the norm's output dtype)
    USE_PDL: tl.constexpr = False,
    HAS_WEIGHT: tl.constexpr = True,  # False: a weight of ones
):
    """One program per row; the row stays in registers between the sum of squares and the scaling."""
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 at 16K rows of 128K
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < N
    y = _normalised_row(X, R, S, W, row, stride_x, stride_r, stride_s, cols, mask, N, eps, weight_offset,
                        HAS_RESIDUAL, "", CAST_BEFORE_WEIGHT, HAS_WEIGHT)
    if QUANT_FP8:
        if ROUND_TO_X:  # what the unfused norm stores, and the quantize kernel reads
            y = y.to(X.dtype.element_ty).to(tl.float32)
        q, scale = fp8_row_codes(y)  # quantize_rows_fp8's arithmetic: the same codes and scale
        tl.store(Y + row * stride_y + cols, q.to(Y.dtype.element_ty), mask=mask)
        tl.store(QS + row, scale)
    else:
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _normalised_row(X, R, S, W, row, stride_x, stride_r, stride_s, cols, mask, N, eps, weight_offset,
                    HAS_RESIDUAL: tl.constexpr, CACHE_MODIFIER: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr):
    """A whole row (cols covers it): x (+ residual, the sum stored to S) RMS-normalised and times the weight, fp32
    (the caller rounds it). CACHE_MODIFIER: the row's loads' (".cg" where other programs wrote it)."""
    h = load_row_plus_residual(X, R, S, row, stride_x, stride_r, stride_s, cols, mask, HAS_RESIDUAL, CACHE_MODIFIER)
    h = h.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    return _weighted(h, W, cols, mask, weight_offset, X.dtype.element_ty, CAST_BEFORE_WEIGHT, HAS_WEIGHT)


@triton.jit
def _weighted(h, W, cols, mask, weight_offset, X_TY: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
              HAS_WEIGHT: tl.constexpr):
    """The normalised row h (fp32) times the norm's weight, in fp32 (the caller rounds it to the output dtype).
    Without a weight (ones) the output dtype is x's, so h is only rounded to it (by the caller)."""
    if not HAS_WEIGHT:
        return h
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if CAST_BEFORE_WEIGHT:
        # Llama: both factors are rounded to their storage dtypes before the product, as in eager PyTorch.
        w = (w + weight_offset).to(W.dtype.element_ty).to(tl.float32)
        return w * h.to(X_TY).to(tl.float32)
    return h * (weight_offset + w)


@triton.jit
def add_rms_norm_rows(X, R, W, OUT, S, M, stride_x, stride_r, stride_o, stride_s, N, eps, weight_offset,
                      CAST_BEFORE_WEIGHT: tl.constexpr, CHUNK: tl.constexpr, WHOLE_ROW: tl.constexpr):
    """`fused_add_rms_norm` of rows 0..M-1 of X (written by other programs of the calling kernel: read through L2)
    by one program: s = X + R stored to S, then s normalised into OUT. The arithmetic of `_rms_norm_kernel` with
    HAS_RESIDUAL, but the sum of squares in another order (the caller's warps, chunks), so the output may differ from
    that kernel's in the last bit. WHOLE_ROW (CHUNK >= N): the row is held in registers from load to store (one
    round trip to memory); else CHUNK columns at a time, S read back for the second pass. For a kernel whose last
    program normalises its own output (kernels/linear_add_norm.py)."""
    for row in range(0, M):
        if WHOLE_ROW:
            cols = tl.arange(0, CHUNK)
            mask = cols < N
            y = _normalised_row(X, R, S, W, row, stride_x, stride_r, stride_s, cols, mask, N, eps, weight_offset,
                                True, ".cg", CAST_BEFORE_WEIGHT, True)
            tl.store(OUT + row * stride_o + cols, y.to(OUT.dtype.element_ty), mask=mask)
        else:
            squares = tl.zeros([CHUNK], dtype=tl.float32)
            for c0 in range(0, N, CHUNK):
                cols = c0 + tl.arange(0, CHUNK)
                mask = cols < N
                h = load_row_plus_residual(X, R, S, row, stride_x, stride_r, stride_s, cols, mask, True, ".cg")
                h = h.to(tl.float32)
                squares += h * h
            rstd = tl.rsqrt(tl.sum(squares, axis=0) / N + eps)
            tl.debug_barrier()  # every thread's stores of S before any thread reads them back
            for c0 in range(0, N, CHUNK):
                cols = c0 + tl.arange(0, CHUNK)
                mask = cols < N
                h = tl.load(S + row * stride_s + cols, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
                y = _weighted(h * rstd, W, cols, mask, weight_offset, X.dtype.element_ty, CAST_BEFORE_WEIGHT, True)
                tl.store(OUT + row * stride_o + cols, y.to(OUT.dtype.element_ty), mask=mask)


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    weight_offset: float = 0.0,
    cast_before_weight: bool = True,
) -> torch.Tensor:
    """Plain-PyTorch RMSNorm, operation for operation as Hugging Face writes it (the spec of `rms_norm`); weight None:
    a weight of ones in x's dtype (the product with 1 is exact, either way round)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return h.to(x.dtype)
    if cast_before_weight:
        return (weight + weight_offset if weight_offset else weight) * h.to(x.dtype)
    return (h * (weight_offset + weight.float())).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    weight_offset: float = 0.0,
    cast_before_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm_ref(x + residual), x + residual)."""
    s = x + residual
    return rms_norm_ref(s, weight, eps, weight_offset=weight_offset, cast_before_weight=cast_before_weight), s


# Warps a row in place of row_launch_settings' choice where not None (benchmarks sweep it). Measured on an H200 in
# W1's batch-1 decode graphs (replay_ab.py, rows of 4096, the default 8 warps): 4, 16 and 32 within 0.4% of it either
# way, 2 warps 0.9-1.1% slower (W1-replay-ab-...-rms-norm-warps-*.json): the default stays.
_NUM_WARPS = None


def _launch(x, residual, weight, out, residual_out, eps, weight_offset, cast_before_weight, row_scales=None):
    # x, residual, out, residual_out: [M, N] row views; residual/residual_out None for the plain norm; row_scales:
    # [M] fp32 with out float8 e4m3 (rms_norm_fp8_rows), else None.
    num_rows, n = x.shape
    if num_rows == 0:
        return
    block, num_warps = row_launch_settings(n)
    num_warps = _NUM_WARPS or num_warps
    has_residual = residual is not None
    r = residual if has_residual else x
    s = residual_out if has_residual else out
    quant = row_scales is not None
    with device_guard(x):
        _rms_norm_kernel[(num_rows,)](
            x, r, x if weight is None else weight, out, s, row_scales if quant else x,
            x.stride(0), r.stride(0), out.stride(0), s.stride(0),
            n, eps, weight_offset,
            HAS_RESIDUAL=has_residual, CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_SIZE=block,
            QUANT_FP8=quant, ROUND_TO_X=quant and _out_dtype(x, weight, cast_before_weight) == x.dtype,
            HAS_WEIGHT=weight is not None, num_warps=num_warps, **pdl_options(x),
        )  # fmt: skip


@register_out_op("rms_norm", mutates_args=("out",))
def _rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor | None, out: torch.Tensor, eps: float, weight_offset: float,
    cast_before_weight: bool,
) -> None:
    if use_triton(x):
        _launch(x, None, weight, out, None, eps, weight_offset, cast_before_weight)
    else:
        out.copy_(rms_norm_ref(x, weight, eps, weight_offset=weight_offset, cast_before_weight=cast_before_weight))


@register_out_op("fused_add_rms_norm", mutates_args=("out", "residual_out"))
def _fused_add_rms_norm_op(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    residual_out: torch.Tensor,
    eps: float,
    weight_offset: float,
    cast_before_weight: bool,
) -> None:
    if use_triton(x):
        _launch(x, residual, weight, out, residual_out, eps, weight_offset, cast_before_weight)
    else:
        y, s = fused_add_rms_norm_ref(
            x, residual, weight, eps, weight_offset=weight_offset, cast_before_weight=cast_before_weight
        )
        residual_out.copy_(s)
        out.copy_(y)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor | None, cast_before_weight: bool) -> torch.dtype:
    if weight is None:
        return x.dtype
    return torch.promote_types(x.dtype, weight.dtype) if cast_before_weight else x.dtype


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    weight_offset: float = 0.0,
    cast_before_weight: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim of `x`; see the module docstring for the math.

    Args:
        x: [..., N], float32/float16/bfloat16, last dim contiguous, N <= 65536.
        weight: [N], float32/float16/bfloat16, on x's device; or None for a weight of ones (the output is h rounded
            to x's dtype; weight_offset must then be 0).
        eps: added to the mean square.
        weight_offset: added to the weight (1.0 for Gemma's zero-centred weight).
        cast_before_weight: True for Llama (round the normalised x to x.dtype, then multiply by the weight),
            False for Gemma (multiply in fp32, then round).
        out: optional [..., N] buffer of the output dtype: promote(x, weight) if cast_before_weight else x.dtype.
    Returns:
        out, [..., N].
    """
    check_float("x", x)
    if weight is not None:
        check_row_param("weight", weight, x)
    elif weight_offset != 0:
        raise ValueError(f"rms_norm without a weight (a weight of ones) takes no weight_offset, got {weight_offset}")
    check_number("eps", eps)
    if out is None and not use_triton(x):  # the CPU path: the reference itself, no buffer nor op dispatch
        norm_outputs(x, None, x.dtype, None, None, allocate=False)  # the checks only
        return ref_output(rms_norm_ref(x, weight, eps, weight_offset=weight_offset,
                                       cast_before_weight=cast_before_weight),
                          _out_dtype(x, weight, cast_before_weight), x)
    out, _ = norm_outputs(x, None, _out_dtype(x, weight, cast_before_weight), out, None)
    _rms_norm_op(
        rows_view("x", x),
        weight,
        rows_view("out", out, writable=True),
        float(eps),
        float(weight_offset),
        bool(cast_before_weight),
    )
    return out


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    weight_offset: float = 0.0,
    cast_before_weight: bool = True,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual (rounded to x.dtype), then `rms_norm(s, ...)`, in one pass over memory.

    Args:
        x, residual: [..., N], same shape and dtype.
        weight, eps, weight_offset, cast_before_weight, out: as for `rms_norm`.
        residual_out: optional [..., N] buffer of x's dtype for s.
    Returns:
        (out, residual_out): the normalised s and s itself (the next layer's residual).
    """
    check_float("x", x)
    check_row_param("weight", weight, x)
    check_number("eps", eps)
    if out is None and residual_out is None and not use_triton(x):  # the CPU path (see rms_norm)
        norm_outputs(x, residual, x.dtype, None, None, allocate=False)  # the checks only
        y, s = fused_add_rms_norm_ref(x, residual, weight, eps, weight_offset=weight_offset,
                                      cast_before_weight=cast_before_weight)
        return ref_output(y, _out_dtype(x, weight, cast_before_weight), x), ref_output(s, x.dtype, x)
    out, residual_out = norm_outputs(x, residual, _out_dtype(x, weight, cast_before_weight), out, residual_out)
    _fused_add_rms_norm_op(
        rows_view("x", x),
        rows_view("residual", residual),
        weight,
        rows_view("out", out, writable=True),
        rows_view("residual_out", residual_out, writable=True),
        float(eps),
        float(weight_offset),
        bool(cast_before_weight),
    )
    return out, residual_out


def rms_norm_fp8_rows(x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None,
                      weight_offset: float = 0.0, cast_before_weight: bool = True):
    """`rms_norm` (`fused_add_rms_norm` with a residual) of rows x [M, N] quantized to float8 e4m3 per row, as
    `quant_linear.quantize_rows_fp8` quantizes the norm's output, in the norm's one kernel (its output is never
    stored in 16 bits). Returns (codes [M, N] e4m3, scales [M, 1] fp32, x + residual or None). For CUDA (and the
    interpreter inside `triton_on_cpu()`): callers check `use_triton` first. x, residual: [M, N] with unit column
    stride; the output dtype of the norm must be x's or float32 (what FP8 linears take)."""
    m, n = x.shape
    codes = torch.empty(m, n, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    summed = torch.empty_like(x) if residual is not None else None
    _launch(x, residual, weight, codes, summed, float(eps), float(weight_offset), bool(cast_before_weight),
            row_scales=scales)  # fmt: skip
    return codes, scales, summed
