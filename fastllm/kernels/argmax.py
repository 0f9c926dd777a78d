"""Greedy decoding's argmax over a few rows of a large vocabulary: `argmax_rows(logits)` = `logits.argmax(-1)`.

PyTorch reduces a row of 128,256 logits (Llama-3's vocabulary) in one reduction of 512 threads: 27.8 us on an H200
in every batch-1 decode step, 9.7 us at Llama-2's 32,000 (profile_step's timelines, 2026-12-01), outside the CUDA
graph and on the GPU's critical path. Here the row is split across programs (stage 1: each program's best column of
its chunk), then one program a row takes the best of those (stage 2).

The same answer as torch.argmax, also at the edges: the first column of the maximum; NaN counts as the largest value
(the first NaN wins); -0.0 ties with +0.0. Each value becomes one int64 key that orders as (value, -column) does:
its fp32 bits made to sort as signed integers (negative numbers' magnitude bits flipped; -0.0 read as +0.0 first;
NaN above +inf) in the high word, 2^32 - 1 - column in the low word, so the largest key is the answer.
"""

import torch

from fastllm.kernels._registry import device_guard, pdl_options, pdl_wait, tl, triton, use_triton

MAX_ROWS = 16  # more rows (large-batch steps) keep torch.argmax, which spreads rows over the card already
_CHUNK = 2048  # columns a stage-1 program reduces: 63 programs a row at 128,256 columns


def argmax_rows_ref(logits: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch spec of `argmax_rows`."""
    return logits.argmax(-1)


@triton.jit
def _keys(values, cols):
    """int64 keys ordering as (value, -column) does (module docstring); values fp32."""
    bits = tl.where(values == 0.0, 0.0, values).to(tl.int32, bitcast=True)  # -0.0 as +0.0: they tie in torch
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    ordered = tl.where(values != values, 0x7FFFFFFF, ordered)  # NaN: above +inf (0x7F800000)
    return (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - cols.to(tl.int64))


@triton.jit
def _chunk_kernel(X, KEYS, stride_x, V, num_chunks, CHUNK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Program (row, chunk): the largest key of columns [chunk * CHUNK, (chunk + 1) * CHUNK) of the row."""
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    values = tl.load(X + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    keys = tl.where(cols < V, _keys(values, cols), -(2**63) + 1)  # masked columns: below every real key
    tl.store(KEYS + row * num_chunks + chunk, tl.max(keys, axis=0))


@triton.jit
def _rows_kernel(KEYS, OUT, num_chunks, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Program (row): the column of the row's largest key among its chunks'."""
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    keys = tl.load(KEYS + row * num_chunks + i, mask=i < num_chunks, other=-(2**63) + 1)
    best = tl.max(keys, axis=0)
    tl.store(OUT + row, 0xFFFFFFFF - (best & 0xFFFFFFFF))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """The column of each row's maximum (first on ties; a NaN counts as the maximum), as torch.argmax(-1): [N] int64.

    Args:
        logits: [N, V] float (fp32, bf16 or fp16), unit column stride. Rows past MAX_ROWS, CPU tensors and V of
            2^31 or more take torch.argmax itself.
    """
    if logits.dim() != 2:
        raise ValueError(f"argmax_rows takes [rows, columns] logits, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"argmax_rows takes floating-point logits, got {logits.dtype}")
    n, v = logits.shape
    if not use_triton(logits) or n == 0 or n > MAX_ROWS or v == 0 or v >= 2**31 or logits.stride(1) != 1:
        return argmax_rows_ref(logits)
    num_chunks = triton.cdiv(v, _CHUNK)
    keys = torch.empty(n, num_chunks, dtype=torch.int64, device=logits.device)
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    pdl = pdl_options(logits)
    with device_guard(logits):
        _chunk_kernel[(n, num_chunks)](logits, keys, logits.stride(0), v, num_chunks, CHUNK=_CHUNK, num_warps=4,
                                       **pdl)
        _rows_kernel[(n,)](keys, out, num_chunks, BLOCK=triton.next_power_of_2(num_chunks), num_warps=1, **pdl)
    return out
