"""Tolerances and helpers shared by the kernel tests (tests/test_kernel_*.py).

One tolerance per dtype, for a kernel output against its reference:
- float32: kernel and reference both compute in fp32 but sum in a different order (and Triton's rsqrt/exp are
  not torch's), so they differ in the last few bits: rtol 1e-5 is ~80 fp32 ulps (eps 1.2e-7), atol 1e-5 covers
  outputs near zero, which are O(1) quantities that cancelled.
- float16: the kernel rounds its fp32 result to fp16 once; the reference rounds the same fp32 value, which may
  differ in the last bits and round the other way: one fp16 ulp, 2^-10 ~ 1e-3 relative.
- float16, Llama's RMSNorm: it rounds twice (h.to(x.dtype), then weight * h). Where the kernel's fp32 h and
  torch's differ in the last bit across a rounding boundary of h, the product differs by one ulp of h relative
  (2^-10), and each side's product rounds once more (<= one more ulp between them): 2^-9 ~ 2e-3 relative, whatever
  the weight. Seen on an H100: 1 element of 8.4M at 2 ulps (0.0039 at 2.65, relative 1.5e-3) at 2048 x 4096.
- bfloat16 (GPU only: the Triton interpreter truncates fp32 -> bf16 casts instead of rounding them to nearest
  even, so it cannot check bf16 rounding): two bf16 ulps, 2 * 2^-7 ~ 1.6e-2 relative, which also bounds the
  two roundings of Llama's RMSNorm.
"""

import torch

TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}

# Outputs rounded twice by the op's own definition (Llama's RMSNorm in half precision), see above.
TWICE_ROUNDED = {**TOLERANCES, torch.float16: {"rtol": 2e-3, "atol": 2e-3}}

CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.bfloat16, torch.float16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rounded_twice: bool = False) -> None:
    """assert_close with the tolerance of `expected`'s dtype; dtypes must match exactly."""
    table = TWICE_ROUNDED if rounded_twice else TOLERANCES
    torch.testing.assert_close(actual, expected, **table[expected.dtype])


def rounded_once(ref, *tensors: torch.Tensor, dtype: torch.dtype, **kwargs) -> torch.Tensor:
    """`ref` evaluated in fp32 on the same inputs, rounded once to `dtype`.

    For ops whose eager reference rounds after every elementwise step in half precision (rotary, the gated
    activations) while the kernel rounds once at the end, this is the value the kernel should produce.
    """
    return ref(*(t.float() for t in tensors), **kwargs).to(dtype)
