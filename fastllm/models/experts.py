"""Mixture-of-experts layers: which of transformers' experts implementations the compiled step traces.

transformers runs MoE experts through an interchangeable implementation (`config._experts_implementation`). Under a
dynamo trace, "grouped_mm" uses torch's grouped GEMM only for bf16 weights; for any other dtype it traces a
fallback op that reads its group offsets on the host (`offs.tolist()`), which a CUDA graph cannot replay (capture
fails on the device-to-host copy). "batched_mm" gathers each token's experts and multiplies them in one batch:
more FLOPs on wide experts, but nothing read on the host. So on CUDA a non-bf16 MoE model is traced with
"batched_mm"; everything else keeps the model's own choice.
"""

from __future__ import annotations

import torch

GRAPH_SAFE = "batched_mm"


def graph_safe_experts(model: torch.nn.Module) -> str | None:
    """The experts implementation to trace `model` with, or None to keep its own (no MoE, or already safe)."""
    current = getattr(model.config, "_experts_implementation", None)
    if current != "grouped_mm" or not callable(getattr(model, "set_experts_implementation", None)):
        return None
    param = next(model.parameters())
    if param.is_cuda and param.dtype != torch.bfloat16:
        return GRAPH_SAFE
    return None
