"""An int4 gate-up projection and the gated activation after it as one launcher:

    y = int4_linear_and_act(x, packed, scales, bias, zeros, activation="silu")
      = silu_and_mul(int4_linear(x, packed, scales, bias, zeros))           (GELU likewise)

At one or two rows (batch-1 / batch-2 decode) the int4 decode kernel stores act(gate) * up itself (its GATED
epilogue: a program sums gate rows and the up rows I apart from them, and the last program of a block sums the K
splits of both): the activation kernel's launch and the [M, 2I] round trip go. The linear's outputs are rounded to
x's dtype before the activation, as the unfused kernels store them, so the result is theirs bit for bit. Past two
rows, off CUDA, or where the kernel's K splits would need the separate reduce kernel, the two launchers run as
unfused. The pass that makes these calls (passes/int4_act_fusion.py) is opt-in: measured slower (its docstring).
"""

from __future__ import annotations

import torch

from fastllm.kernels._registry import use_triton
from fastllm.kernels.fp8_input_linear import ACTIVATIONS
from fastllm.kernels.quant_linear import _int4_gemv, check_split_counters, int4_linear, int4_linear_ref

# Rows the gated epilogue takes: the decode kernel's broadcast form (its dot form, 3-16 rows, keeps the activation
# kernel).
GATED_MAX_ROWS = 2


def int4_linear_and_act_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                            bias: torch.Tensor | None = None, zeros: torch.Tensor | None = None, *,
                            activation: str = "silu", split_counters: torch.Tensor | None = None) -> torch.Tensor:
    """The spec: `int4_linear_ref`, then the activation's reference (`silu_and_mul_ref`, `gelu_and_mul_ref`).
    split_counters: accepted (and unused) so that a graph's call keeps its arguments with the reference."""
    return ACTIVATIONS[activation][1](int4_linear_ref(x, packed, scales, bias, zeros))


def int4_linear_and_act(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                        zeros: torch.Tensor | None = None, *, activation: str = "silu",
                        split_counters: torch.Tensor | None = None) -> torch.Tensor:
    """`int4_linear_and_act_ref`'s result (see the module docstring).

    Args:
        x, packed, scales, bias, zeros, split_counters: the int4 linear's, as for `int4_linear` (packed [2I, K / 2]:
            the gate rows, then the up rows).
        activation: "silu", "gelu" or "gelu_tanh".
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    check_split_counters(split_counters, x)
    n, k = packed.shape[0], packed.shape[1] * 2
    rows = x.reshape(-1, k) if x.shape[-1] == k else None
    group = k // scales.shape[1] if scales.dim() == 2 and scales.shape[1] else 0
    if (rows is not None and use_triton(x) and 0 < rows.shape[0] <= GATED_MAX_ROWS and n > 0 and n % 2 == 0
            and group >= 32 and group & (group - 1) == 0):  # fmt: skip
        y = _int4_gemv(rows, packed, scales, bias, zeros, split_counters=split_counters, activation=activation)
        if y is not None:
            return y.reshape(*x.shape[:-1], n // 2)
    return ACTIVATIONS[activation][0](int4_linear(x, packed, scales, bias, zeros, split_counters=split_counters))


__all__ = ["int4_linear_and_act", "int4_linear_and_act_ref"]
