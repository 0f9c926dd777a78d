"""Shared kernel and launcher of the gated activations `silu_and_mul` and `gelu_and_mul`.

For x = [gate | up] along the last dim (2I columns): y = act(gate) * up, with act one of

    silu:       g / (1 + exp(-g))
    gelu:       g/2 * (1 + erf(g / sqrt(2)))
    gelu_tanh:  g/2 * (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) = g * sigmoid(2 sqrt(2/pi) (g + 0.044715 g^3))

The sigmoid form of gelu_tanh is the same function and avoids `tanh`, whose Triton spelling moved between
versions (libdevice imports); it also keeps digits for very negative g, where 1 + tanh(...) cancels.
"""

import torch

from fastllm.kernels._registry import (
    check_float,
    device_guard,
    fp8_row_codes,
    next_power_of_2,
    out_or_new,
    pdl_options,
    pdl_wait,
    row_launch_settings,
    rows_view,
    tl,
    triton,
)


@triton.jit
def _act_and_mul_kernel(
    X,  # [M, 2I], row stride stride_x
    Y,  # [M, I], row stride stride_y
    stride_x,
    stride_y,
    inter,  # I
    ACTIVATION: tl.constexpr,  # "silu", "gelu" or "gelu_tanh"
    BLOCK_SIZE: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Program (row, block) computes y[row, block*BLOCK_SIZE : (block+1)*BLOCK_SIZE] in fp32."""
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 at 75K rows of 2 x 14336
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < inter
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (gated_activation(g, ACTIVATION) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _act_and_mul_fp8_kernel(
    X,  # [M, 2I], row stride stride_x
    Q,  # [M, I] float8 e4m3 codes, row stride stride_q
    QS,  # [M] fp32 row scales
    stride_x,
    stride_q,
    inter,  # I
    ACTIVATION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # >= I: a program holds its row
    USE_PDL: tl.constexpr = False,
):
    """Program (row): act(gate) * up rounded to x's dtype (what `_act_and_mul_kernel` stores), then quantized per
    row as `quantize_rows_fp8` quantizes it (`fp8_row_codes`: the same codes and scale)."""
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < inter
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = (gated_activation(g, ACTIVATION) * u).to(X.dtype.element_ty).to(tl.float32)
    q, scale = fp8_row_codes(y)
    tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(QS + row, scale)


@triton.jit
def gated_activation(g, ACTIVATION: tl.constexpr):
    """act(g) in fp32 for ACTIVATION "silu", "gelu" or "gelu_tanh" (this kernel's, and the skinny GEMM's prologue's:
    the same values)."""
    if ACTIVATION == "silu":
        a = g / (1.0 + tl.exp(-g))
    elif ACTIVATION == "gelu":
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))  # 1/sqrt(2)
    else:
        z = 1.5957691216057308 * (g + 0.044715 * g * g * g)  # 2*sqrt(2/pi) (...)
        # sigmoid(z) from e = exp(-|z|) <= 1: no overflow for very negative z, where the cube makes |z| > 88.
        e = tl.exp(-tl.abs(z))
        a = g * (tl.where(z >= 0, 1.0, e) / (1.0 + e))
    return a


def act_and_mul_out(x: torch.Tensor, out: torch.Tensor | None, allocate: bool = True) -> torch.Tensor | None:
    """Check x ([..., 2I]) and return `out` ([..., I], x's dtype), allocated if None (unless not `allocate`)."""
    check_float("x", x)
    if x.shape[-1] == 0 or x.shape[-1] % 2:
        raise ValueError(f"x's last dim must be even and positive ([..., 2 * intermediate]), got {x.shape[-1]}")
    if out is None and not allocate:
        return None
    return out_or_new("out", out, (*x.shape[:-1], x.shape[-1] // 2), x.dtype, x.device)


def launch_act_and_mul(x: torch.Tensor, out: torch.Tensor, activation: str) -> None:
    """Run the kernel on x [..., 2I] into out [..., I]."""
    x, y = rows_view("x", x), rows_view("out", out, writable=True)
    num_rows, inter = y.shape
    if num_rows == 0:
        return
    # Decode has a handful of rows: 256-wide blocks spread a 14336-wide row over 56 programs instead of 14.
    block = min(next_power_of_2(inter), 1024 if num_rows >= 64 else 256)
    with device_guard(x):
        _act_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](
            x, y, x.stride(0), y.stride(0), inter,
            ACTIVATION=activation, BLOCK_SIZE=block, num_warps=max(1, block // 256), **pdl_options(x),
        )  # fmt: skip


def act_and_mul_fp8_rows(x: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """act(gate) * up of rows x [M, 2I] (unit column stride) quantized to float8 e4m3 per row, as
    `quant_linear.quantize_rows_fp8` quantizes the activation kernel's output, in one kernel: (codes [M, I], scales
    [M, 1] fp32). For CUDA (and the interpreter inside `triton_on_cpu()`); rows of I <= 65536 / 2."""
    num_rows, inter = x.shape[0], x.shape[1] // 2
    codes = torch.empty(num_rows, inter, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    if num_rows:
        block, num_warps = row_launch_settings(inter)
        with device_guard(x):
            _act_and_mul_fp8_kernel[(num_rows,)](
                x, codes, scales, x.stride(0), codes.stride(0), inter,
                ACTIVATION=activation, BLOCK_SIZE=block, num_warps=num_warps, **pdl_options(x),
            )  # fmt: skip
    return codes, scales
