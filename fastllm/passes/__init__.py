"""Fusion passes over a captured graph. Each pass lives in its own module with `pattern()` (what it
matches, in plain PyTorch), `replacement()` (what it becomes) and `apply(ctx) -> number of matches`."""

from __future__ import annotations

from collections import Counter

from torch import fx

from fastllm import kernels
from fastllm.passes import attention, dropout, gated_mlp, layer_norm, qkv, rms_norm, rotary, skinny_linear
from fastllm.passes._context import PassContext, WeightMerger
from fastllm.passes._graph import eliminate_dead_code

# Passes a user can choose (OptimizeConfig.passes); the runtime adds "attention" for its paged-cache graph,
# and "skinny_linear" (small-batch GEMMs), which pays off where decode buckets are CUDA graphs.
PASSES = {module.NAME: module for module in (dropout, rms_norm, layer_norm, rotary, gated_mlp, qkv)}
RUNTIME_PASSES = {**PASSES, attention.NAME: attention, skinny_linear.NAME: skinny_linear}

FUSED_OPS = {
    kernels.rms_norm, kernels.fused_add_rms_norm, kernels.layer_norm, kernels.fused_add_layer_norm,
    kernels.rotary_embedding, kernels.silu_and_mul, kernels.gelu_and_mul, kernels.skinny_linear, kernels.step_attention,
}

# Shape bookkeeping that moves no data worth fusing; left out of the "unfused" list so it shows work.
_BOOKKEEPING = {
    "getitem", "view", "reshape", "transpose", "permute", "contiguous", "unsqueeze", "squeeze", "size",
    "expand", "flatten", "split", "chunk", "_log_api_usage_once", "arange", "tensor", "to", "float", "dim",
}


def resolve_passes(selected: tuple[str, ...]) -> tuple[str, ...]:
    """The passes to run for a user's selection, in order, with the ones the runtime requires."""
    return (*selected, "attention", "skinny_linear")


def run_passes(gm: fx.GraphModule, tensors: dict, merger: WeightMerger, names: tuple[str, ...],
               model_config: object | None = None, step_context: int | None = None) -> dict[str, int]:
    """Apply the passes `names` in order; returns matches per pass. `step_context`: the id of the StepContext that
    the attention ops emitted into this graph read (the compile step's)."""
    ctx = PassContext(gm=gm, tensors=tensors, merger=merger, model_config=model_config, step_context=step_context)
    counts = {name: RUNTIME_PASSES[name].apply(ctx) for name in names}
    if "attention" in names:
        # The model's mask construction now feeds nothing; the drop-in graph keeps HF's in-place cache
        # updates, so only the runtime graph (which has none) is swept.
        eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return counts


def op_histogram(gm: fx.GraphModule) -> tuple[Counter, Counter]:
    """(fused op counts, unfused op counts) of the calls left in the graph."""
    fused, unfused = Counter(), Counter()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        if node.target in FUSED_OPS:
            fused[node.target.__name__] += 1
            continue
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        if name not in _BOOKKEEPING:
            unfused[name] += 1
    return fused, unfused
