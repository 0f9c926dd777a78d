"""Tolerances and helpers shared by the kernel tests (tests/test_kernel_*.py).

One tolerance per dtype, for a kernel output against its reference:
- float32: kernel and reference both compute in fp32 but sum in a different order (and Triton's rsqrt/exp are
  not torch's), so they differ in the last few bits: rtol 1e-5 is ~80 fp32 ulps (eps 1.2e-7), atol 1e-5 covers
  outputs near zero, which are O(1) quantities that cancelled.
- float16: the kernel rounds its fp32 result to fp16 once; the reference rounds the same fp32 value, which may
  differ in the last bits and round the other way: one fp16 ulp, 2^-10 ~ 1e-3 relative.
- bfloat16 (GPU only: the Triton interpreter truncates fp32 -> bf16 casts instead of rounding them to nearest
  even, so it cannot check bf16 rounding): one to two bf16 ulps, 2 * 2^-7 ~ 1.6e-2 relative.
"""

import torch

TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}

CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.bfloat16, torch.float16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """assert_close with the tolerance of `expected`'s dtype; dtypes must match exactly."""
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype])


def rounded_once(ref, *tensors: torch.Tensor, dtype: torch.dtype, **kwargs) -> torch.Tensor:
    """`ref` evaluated in fp32 on the same inputs, rounded once to `dtype`.

    For ops whose eager reference rounds after every elementwise step in half precision (rotary, the gated
    activations) while the kernel rounds once at the end, this is the value the kernel should produce.
    """
    return ref(*(t.float() for t in tensors), **kwargs).to(dtype)
