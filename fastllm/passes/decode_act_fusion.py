"""Decode GEMMs take in their gated activation: `skinny_linear(silu_and_mul(h), W)` → `fused_linear(h, W,
prologue="silu")` (GELU likewise).

The one part of decode_fusion that measured faster on its own: a Llama-3.1-8B down projection with SiLU * up read
inside it took 29.4 us against 36.6 for the activation kernel and the GEMM at 1 row (H200, 2026-11-30,
W5-fused-linear, 8 rows of W a program), where folding the norms in cost more than it saved. Whole decode (W1, same
GPU and day, one call): 261.7 against 251.3 tok/s without it (Llama-2-7B shape), 237.7 against 219.8
(Llama-3.1-8B); an earlier call 229.2 against 226.9. On by default. fused_linear takes the activation inside the GEMM
for a single row only (batch-1 decode, which runs a 1-row graph); with more rows it runs the activation kernel and
the GEMM as before (kernels/fused_linear.py's PROLOGUE_MAX_ROWS says why). FP8 / int8 down projections keep the
activation kernel unless decode_fusion.FUSE_QUANTIZED (measured slower there; that flag's comment has the numbers).
"""

from __future__ import annotations

import torch

from fastllm import kernels
from fastllm.passes import decode_fusion
from fastllm.passes._context import PassContext

NAME = "decode_act_fusion"
RUNS_AFTER: tuple[str, ...] = ("gated_mlp", "skinny_linear")
RUNS_BEFORE: tuple[str, ...] = ("decode_fusion",)  # which then finds the activations taken in
RUNTIME_REQUIRED = False


def pattern(gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return kernels.skinny_linear(kernels.silu_and_mul(gate_up), w_down)


def replacement(gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return kernels.fused_linear(gate_up, w_down, prologue="silu")


def apply(ctx: PassContext) -> int:
    return decode_fusion.fuse_activations(ctx.gm.graph)
