"""Block-scaled FP8 weights dequantized in one kernel: `fp8.dequantize_blocks(q, scale_inv, dtype)`'s bits.

    w = dequantize_blocks_kernel(q, scale_inv, torch.bfloat16)   # [N, K] e4m3 codes x their block's multiplier

Long prefills of a block-wise FP8 checkpoint (past quant_linear.BLOCK_FP8_GEMM_MAX_ROWS rows, or fp32 rows) hand
cuBLAS the weight dequantized into the model's dtype on every call. In PyTorch that is three passes over [N, K]
(the codes widened to fp32, the product, the rounding: ~19 bytes moved a weight); here one: a byte read, the model
dtype's two or four written. Each element is its code in fp32 times its block's multiplier in fp32, rounded once to
`dtype`, as there (the same bits). On the CPU, under `triton_on_cpu()`, through the interpreter.
"""

from __future__ import annotations

import torch

from fastllm.kernels._registry import device_guard, tl, triton

# Bytes of codes a program reads: 8 KB, as the int4 dequantize kernel's packed words.
_CODES_A_PROGRAM = 8192
# Columns a program takes at most: a power of two dividing the block's columns, so one multiplier a row.
_MAX_BLOCK_K = 256


@triton.jit
def _fp8_block_dequantize_kernel(Q, S, OUT, N, stride_qn, stride_sn, stride_on,
                                 SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr):  # fmt: skip
    """Program (n block, k block): OUT[n, k] = float(Q[n, k]) * S[n // SCALE_ROWS, k // SCALE_COLS] in fp32, rounded
    to OUT's dtype. BLOCK_K divides SCALE_COLS, so a program's columns lie in one block column."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    in_range = n < N
    rows = n.to(tl.int64)
    cols = k0 + tl.arange(0, BLOCK_K)
    codes = tl.load(Q + rows[:, None] * stride_qn + cols[None, :], mask=in_range[:, None], other=0.0)
    scale = tl.load(S + (rows // SCALE_ROWS) * stride_sn + k0 // SCALE_COLS, mask=in_range, other=0.0)
    weight = codes.to(tl.float32) * scale[:, None]
    tl.store(OUT + rows[:, None] * stride_on + cols[None, :], weight.to(OUT.dtype.element_ty), mask=in_range[:, None])


def dequantize_blocks_kernel(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [N, K] float8 e4m3 (unit column stride), scale_inv [N / bn, K / bk] multipliers of blocks that tile q ->
    [N, K] in `dtype`, `fp8.dequantize_blocks(q, scale_inv, dtype)` bit for bit. ValueError where the blocks do not
    tile q or q's columns are not contiguous."""
    n, k = q.shape
    rows, cols = scale_inv.shape
    if rows == 0 or cols == 0 or n % rows or k % cols:
        raise ValueError(f"scales {tuple(scale_inv.shape)} do not tile a weight of {(n, k)} exactly")
    if k and q.stride(1) != 1:
        raise ValueError(f"the codes' columns must be contiguous (strides {q.stride()})")
    scale_rows, scale_cols = n // rows, k // cols
    out = torch.empty(n, k, dtype=dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_k = min(_MAX_BLOCK_K, scale_cols & -scale_cols)  # the largest power of two dividing the block's columns
    block_n = max(1, _CODES_A_PROGRAM // block_k)
    scales = scale_inv.float().contiguous()  # fp32 multipliers, as dequantize_blocks takes them
    with device_guard(q):
        _fp8_block_dequantize_kernel[(triton.cdiv(n, block_n), k // block_k)](
            q, scales, out, n, q.stride(0), scales.stride(0), out.stride(0),
            SCALE_ROWS=scale_rows, SCALE_COLS=scale_cols, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        )  # fmt: skip
    return out
