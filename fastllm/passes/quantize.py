"""Linear → quantized linear, when the model is optimized with `quantization=` (`fastllm/quant/config.py`).

Each linear whose weight is a model parameter (or a merged QKV / gate-up weight) and whose layer is not excluded
becomes `kernels.fp8_linear`, `int8_linear` or `int4_linear` on the weight quantized once, here (the quantized
tensors become constants of the graph). Layers are named by their modules (`model.layers.0.self_attn.q_proj`; a
merged weight by its parts, joined with "+"); a merged weight is quantized only if none of its parts is excluded.
A layer the scheme cannot take (int4 with in-features not a multiple of the group size) stays in the model's dtype
and is reported so. Without `quantization` this pass changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllm import kernels
from fastllm.passes._context import PassContext
from fastllm.passes._graph import arg, is_op
from fastllm.quant import fp8, int_weight

NAME = "quantize"
# After the passes that merge linears (it quantizes the merged weights), before skinny_linear (which takes the
# linears left in the model's dtype).
RUNS_AFTER: tuple[str, ...] = ("gated_mlp", "qkv")
RUNS_BEFORE: tuple[str, ...] = ("skinny_linear",)
RUNTIME_REQUIRED = True

LAUNCHERS = {"fp8": kernels.fp8_linear, "int8": kernels.int8_linear, "int4": kernels.int4_linear}


def pattern(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def replacement(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    return kernels.fp8_linear(x, qweight, weight_scale)


def quantized_tensors(weight: torch.Tensor, scheme: str, group_size: int) -> tuple[torch.Tensor, ...]:
    """The tensors a scheme's linear takes in place of `weight`."""
    if scheme == "fp8":
        return fp8.quantize_weight(weight)
    if scheme == "int8":
        return int_weight.quantize_int8(weight)
    return int_weight.quantize_int4(weight, group_size)


def _weight(ctx: PassContext, node: object) -> torch.Tensor | None:
    if node is None:
        return None
    if getattr(node, "op", None) == "get_attr":
        return getattr(ctx.gm, node.target, None)
    return ctx.tensor(node)


def apply(ctx: PassContext) -> int:
    config = ctx.quantization
    if config is None:
        return 0
    graph = ctx.gm.graph
    count = 0
    for node in list(graph.nodes):
        if not is_op(node, "linear"):
            continue
        weight = _weight(ctx, arg(node, 1, "weight"))
        if weight is None or weight.dim() != 2 or not weight.is_floating_point():
            continue
        names = ctx.module_names(weight)
        if not names or any(config.excludes(n) for n in names):
            continue
        layer = "+".join(names)
        if config.weights == "int4" and weight.shape[1] % config.group_size:
            ctx.quantized_layers[layer] = f"not quantized: in-features {weight.shape[1]} not a multiple of " \
                                          f"group size {config.group_size}"
            continue
        key = (weight.data_ptr(), tuple(weight.shape), config.weights, config.group_size)
        if key not in ctx.merger.quantized:  # one quantized copy per weight, however many graphs use it
            ctx.merger.quantized[key] = quantized_tensors(weight, config.weights, config.group_size)
        constants = [ctx.constant(t, before=node) for t in ctx.merger.quantized[key]]
        with graph.inserting_before(node):
            quantized = graph.call_function(LAUNCHERS[config.weights], (node.args[0], *constants,
                                                                         arg(node, 2, "bias")))
        quantized.meta.update(node.meta)
        node.replace_all_uses_with(quantized)
        graph.erase_node(node)
        ctx.quantized_layers[layer] = config.label
        count += 1
    return count
