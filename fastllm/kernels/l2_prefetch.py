"""Ask the GPU's L2 cache for a weight's first bytes ahead of the kernel that reads it.

    prefetch_l2(weight, like)      # returns at once; the copy engine fills L2 while the next kernels run

A batch-1 decode step alternates memory-bound GEMVs with small kernels (norms, rotary and the KV write, attention)
during which the memory bus sits nearly idle. Launched right after one GEMV, this kernel has the next GEMV's first
`max_bytes` (at most what L2 holds comfortably) travel into L2 while those small kernels run, so the GEMV finds them
there. It reads and writes no tensor: the bulk prefetch (`cp.async.bulk.prefetch.L2`, sm_90+) is a hint with no
effect on any result. Elsewhere it launches nothing: on the CPU, before sm_90, for steps of more than PDL_MAX_ROWS
rows (prefill, large batches: compute-bound GEMMs), and where the weight's address is not 16-byte aligned.

Under programmatic dependent launch (`pdl_wait`) the kernel lets its successor be scheduled, waits for the kernel
before it (so its traffic does not compete with the GEMV it follows, and the chain of waits still orders every
kernel after all earlier ones), then issues the prefetches and exits.
"""

from __future__ import annotations

import functools

import torch
from torch.fx.node import has_side_effect

from fastllm.kernels._registry import (
    HAS_TRITON,
    PDL_MAX_ROWS,
    device_guard,
    pdl_options,
    pdl_release_then_wait,
    tl,
    triton,
)

# What a prefetch asks for at most: the GEMV reads the rows in this span first (its first programs' rows), and the
# span must stay in L2 (50 MB on an H100 / H200) through the kernels between.
PREFETCH_MAX_BYTES = 24 << 20
_THREAD_BYTES = 16 << 10  # one bulk prefetch a thread
_WARPS = 1
_PROGRAM_BYTES = _THREAD_BYTES * 32 * _WARPS


@triton.jit
def _bulk_prefetch_l2(addresses, sizes):
    """cp.async.bulk.prefetch.L2 of sizes[i] bytes at addresses[i] (16-byte aligned, sizes multiples of 16)."""
    return tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
        "=r,l,r", [addresses, sizes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _l2_prefetch_kernel(W, nbytes, THREAD_BYTES: tl.constexpr, THREADS: tl.constexpr, USE_PDL: tl.constexpr):
    """Program p, thread t: bytes [(p THREADS + t) THREAD_BYTES, + THREAD_BYTES) of W's first nbytes (a multiple of
    16); the last thread's span is cut at nbytes, threads past it prefetch W's last 16 bytes again (harmless)."""
    pdl_release_then_wait(USE_PDL)
    start = (tl.program_id(0) * THREADS + tl.arange(0, THREADS)).to(tl.int64) * THREAD_BYTES
    start = tl.minimum(start, nbytes - 16)
    size = tl.minimum(nbytes - start, THREAD_BYTES).to(tl.int32)
    _bulk_prefetch_l2(W.to(tl.pointer_type(tl.uint8), bitcast=True) + start, size)


@functools.cache
def _has_bulk_prefetch(device_index: int) -> bool:
    """cp.async.bulk needs an NVIDIA GPU of compute capability 9.0+ (not a ROCm build)."""
    return HAS_TRITON and torch.version.hip is None and torch.cuda.get_device_capability(device_index) >= (9, 0)


def _launches(weight: torch.Tensor, like: torch.Tensor) -> bool:
    if not (weight.is_cuda and like.dim() >= 1 and like.numel() // max(like.shape[-1], 1) <= PDL_MAX_ROWS):
        return False
    index = weight.device.index if weight.device.index is not None else torch.cuda.current_device()
    return weight.data_ptr() % 16 == 0 and _has_bulk_prefetch(index)


@has_side_effect  # nothing uses its (absent) result: dead-code elimination must keep it
def prefetch_l2(weight: torch.Tensor, like: torch.Tensor, max_bytes: int = PREFETCH_MAX_BYTES) -> None:
    """Start filling L2 with the first min(max_bytes, weight's bytes) of `weight` (see the module docstring).

    Args:
        weight: a contiguous tensor (a model weight: nothing on the stream writes it).
        like: a tensor whose rows (all dims but the last) are the step's tokens: the prefetch runs only for steps
            of at most PDL_MAX_ROWS rows.
        max_bytes: a positive int.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    if not weight.is_contiguous():
        raise ValueError("prefetch_l2 takes a contiguous weight (its first bytes are its first rows)")
    if not _launches(weight, like):
        return
    nbytes = min(max_bytes, weight.numel() * weight.element_size()) // 16 * 16
    if nbytes == 0:
        return
    with device_guard(weight):
        _l2_prefetch_kernel[(triton.cdiv(nbytes, _PROGRAM_BYTES),)](
            weight, nbytes, THREAD_BYTES=_THREAD_BYTES, THREADS=32 * _WARPS, num_warps=_WARPS,
            **pdl_options(like.reshape(-1, like.shape[-1])),
        )  # fmt: skip


__all__ = ["PREFETCH_MAX_BYTES", "prefetch_l2"]
