"""Mixture-of-experts layers: which of transformers' experts implementations the compiled step traces, and where each
MoE family keeps its routers and experts (`MOE`, data the quantize pass reads).

transformers runs MoE experts through an interchangeable implementation (`config._experts_implementation`). Under a
dynamo trace, "grouped_mm" uses torch's grouped GEMM only for bf16 weights; for any other dtype it traces a
fallback op that reads its group offsets on the host (`offs.tolist()`), which a CUDA graph cannot replay (capture
fails on the device-to-host copy). "batched_mm" gathers each token's experts and multiplies them in one batch:
more FLOPs on wide experts, but nothing read on the host. So on CUDA a non-bf16 MoE model is traced with
"batched_mm"; everything else keeps the model's own choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRAPH_SAFE = "batched_mm"


@dataclass(frozen=True)
class MoeLayout:
    """A MoE family's modules, by dotted suffix of their names (as `QuantConfig.exclude` names layers).

    routers: the linears whose outputs choose and weigh each token's experts (and a shared expert's sigmoid gate,
        Qwen2-MoE's `shared_expert_gate`). Quantization keeps them in the model's dtype: a router's logits decide the
        top-k, so its rounding error can send a token to other experts, and its weight is only experts x hidden.
    experts: the modules holding the experts' weights, 3-D in transformers 5 (one matrix per expert), which
        fastllm's quantized linears (2-D weights) do not take; explain() lists them as not quantized.
    """

    routers: tuple[str, ...]
    experts: tuple[str, ...] = ("mlp.experts",)


# model_type -> its MoE layout, as transformers 5.x names the modules (each entry is checked against a tiny model of
# its family in tests/test_fixes_quant_20261202b.py). A MoE family missing here gets its routers quantized, and the
# quantize pass warns so.
MOE = {
    "mixtral": MoeLayout(routers=("mlp.gate",)),
    "minimax": MoeLayout(routers=("mlp.gate",)),
    "minimax_m2": MoeLayout(routers=("mlp.gate",)),
    "olmoe": MoeLayout(routers=("mlp.gate",)),
    "qwen2_moe": MoeLayout(routers=("mlp.gate", "mlp.shared_expert_gate")),
    "qwen3_moe": MoeLayout(routers=("mlp.gate",)),
    "qwen3_next": MoeLayout(routers=("mlp.gate", "mlp.shared_expert_gate")),
    "phimoe": MoeLayout(routers=("mlp.router",)),
    "gpt_oss": MoeLayout(routers=("mlp.router",)),
    "granitemoe": MoeLayout(routers=("block_sparse_moe.router",), experts=("block_sparse_moe.experts",)),
    "granitemoeshared": MoeLayout(routers=("block_sparse_moe.router",), experts=("block_sparse_moe.experts",)),
    "deepseek_v2": MoeLayout(routers=("mlp.gate",)),
    "deepseek_v3": MoeLayout(routers=("mlp.gate",)),
    "glm4_moe": MoeLayout(routers=("mlp.gate",)),
    "hunyuan_v1_moe": MoeLayout(routers=("mlp.gate.wg",)),
}


def moe_layout(config) -> MoeLayout | None:
    """The MoE layout of a model's family (its HF config), or None (dense, or a MoE family not in `MOE`)."""
    return MOE.get(getattr(config, "model_type", None))


def _names(module_name: str, suffix: str) -> bool:
    return module_name == suffix or module_name.endswith("." + suffix)


def is_router(layout: MoeLayout | None, module_name: str) -> bool:
    """Whether `module_name` is one of the layout's routers."""
    return layout is not None and any(_names(module_name, s) for s in layout.routers)


def is_experts(layout: MoeLayout | None, module_name: str) -> bool:
    """Whether `module_name` holds the layout's experts."""
    return layout is not None and any(_names(module_name, s) for s in layout.experts)


def graph_safe_experts(model: torch.nn.Module) -> str | None:
    """The experts implementation to trace `model` with, or None to keep its own (no MoE, or already safe)."""
    current = getattr(model.config, "_experts_implementation", None)
    if current != "grouped_mm" or not callable(getattr(model, "set_experts_implementation", None)):
        return None
    param = next(model.parameters())
    if param.is_cuda and param.dtype != torch.bfloat16:
        return GRAPH_SAFE
    return None
