"""Fusion passes over a captured graph. Each pass lives in its own module with `pattern()` (what it
matches, in plain PyTorch), `replacement()` (what it becomes), `apply(ctx) -> number of matches`, and its
`NAME` and order constraints, from which `registry.py` derives the one order the passes run in."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from torch import fx

from fastllm import kernels
from fastllm.passes import reference_ops, registry
from fastllm.passes._context import PassContext, WeightMerger
from fastllm.passes._graph import eliminate_dead_code

if TYPE_CHECKING:
    from fastllm.quant.checkpoints import Prequantized

# Which passes run, and in what order, is registry.py's business; these are its answers, re-exported.
ALL_PASSES = registry.ALL_PASSES              # user-selectable, in canonical order
DEFAULT_PASSES = registry.DEFAULT_PASSES      # what optimize() selects unless told (ALL_PASSES but the opt-in ones)
RUNTIME_REQUIRED = registry.RUNTIME_REQUIRED  # added to every selection on the runtime's graph
resolve_passes = registry.resolve_passes      # selection -> every pass to run on the compiled step, in order

FUSED_OPS = {
    kernels.rms_norm, kernels.fused_add_rms_norm, kernels.layer_norm, kernels.fused_add_layer_norm,
    kernels.rotary_embedding, kernels.silu_and_mul, kernels.gelu_and_mul, kernels.skinny_linear, kernels.step_attention,
    kernels.fp8_linear, kernels.int8_linear, kernels.int4_linear, kernels.fused_linear, kernels.rms_norm_fp8_linear,
    kernels.act_and_mul_fp8_linear, kernels.int4_linear_and_act, kernels.linear_add_rms_norm,
    *reference_ops.LAUNCHER_OF,  # on CPU graphs the references stand in for the launchers (reference_ops.py)
}

# Shape bookkeeping that moves no data worth fusing; left out of the "unfused" list so it shows work.
_BOOKKEEPING = {
    "getitem", "view", "reshape", "transpose", "permute", "contiguous", "unsqueeze", "squeeze", "size",
    "expand", "flatten", "split", "chunk", "_log_api_usage_once", "arange", "tensor", "to", "float", "dim",
}


def run_passes(gm: fx.GraphModule, tensors: dict, merger: WeightMerger, names: tuple[str, ...],
               model_config: object | None = None, step_context: int | None = None, *,
               quantization: object | None = None, parameters: dict | None = None,
               quantized_layers: dict | None = None, prequantized: Prequantized | None = None,
               step_inputs: tuple[fx.Node | None, ...] = (), max_positions: int | None = None) -> dict[str, int]:
    """Apply the passes `names` in their canonical order (the order given does not matter; see registry.py).

    Runs exactly `names`, adding none: for the compiled step callers pass `resolve_passes(selection)`.
    `step_context`: the id of the StepContext that the attention ops emitted into this graph read.
    `quantization` (a QuantConfig) and `parameters` (the model's, by name) feed the quantize pass, which fills
    `quantized_layers` (layer -> scheme); `prequantized` (a checkpoint's quantized layers, quant/checkpoints.py)
    replaces quantizing. `step_inputs`: the runtime step graph's input placeholders (token ids, positions, sampled
    rows; None where one is not a placeholder) and `max_positions` its max_model_len, for rope_table.
    Returns the matches per pass, in the order the passes ran. Raises ValueError for an unknown name.
    """
    ctx = PassContext(gm=gm, tensors=tensors, merger=merger, model_config=model_config, step_context=step_context,
                      quantization=quantization, parameters=parameters or {},
                      quantized_layers=quantized_layers if quantized_layers is not None else {},
                      prequantized=prequantized,
                      step_inputs=frozenset(n for n in step_inputs if n is not None),
                      positions=step_inputs[1] if len(step_inputs) > 1 else None, max_positions=max_positions)
    counts = {name: registry.REGISTRY.module(name).apply(ctx) for name in registry.order_passes(names)}
    if "attention" in names:
        # The model's mask construction now feeds nothing (the runtime's metadata replaced the masks). Only a graph
        # whose attention was paged is swept: one that still calls HF's attention may hold in-place updates.
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
            # A registered op's overload (`step_attention.default`) is named by its op, a reference by its launcher.
            target = reference_ops.LAUNCHER_OF.get(node.target, node.target)
            fused[getattr(target, "_opname", None) or target.__name__] += 1
            continue
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        if name not in _BOOKKEEPING:
            unfused[name] += 1
    return fused, unfused
