"""LayerNorm over the last dim (optionally with the residual add before it) → one kernel call.

Dynamo records `nn.LayerNorm` as `F.layer_norm(x, (hidden,), weight, bias, eps)`. When x is `a + b`
(the residual stream), the add is fused too; the kernel returns the normalized output and the sum.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from fastllm import kernels
from fastllm.passes._context import PassContext
from fastllm.passes._graph import arg, erase_dead, fake, is_op
from fastllm.passes.rms_norm import _residual_operands

NAME = "layer_norm"
RUNS_AFTER: tuple[str, ...] = ()
RUNS_BEFORE: tuple[str, ...] = ()
RUNTIME_REQUIRED = False


def pattern(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """What this pass matches, written out in PyTorch."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def replacement(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return kernels.layer_norm(x, weight, bias, eps)


def match(node: fx.Node) -> tuple[fx.Node, object, object, float] | None:
    """(x, weight, bias, eps) for a layer_norm over the last dim only."""
    if not is_op(node, "layer_norm"):
        return None
    x, shape = node.args[0], arg(node, 1, "normalized_shape")
    t = fake(x)
    if t is None or not isinstance(shape, (tuple, list)) or len(shape) != 1 or shape[0] != t.shape[-1]:
        return None
    eps = arg(node, 4, "eps", 1e-5)
    if not isinstance(eps, (int, float)):
        return None
    return x, arg(node, 2, "weight"), arg(node, 3, "bias"), float(eps)


def apply(ctx: PassContext) -> int:
    graph = ctx.gm.graph
    count = 0
    for node in list(graph.nodes):
        m = match(node)
        if m is None:
            continue
        x, weight, bias, eps = m
        residual = _residual_operands(x) if isinstance(x, fx.Node) else None
        if residual is None:
            with graph.inserting_before(node):
                fused = graph.call_function(kernels.layer_norm, (x, weight, bias, eps))
            fused.meta.update(node.meta)
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
        else:
            with graph.inserting_after(x):
                both = graph.call_function(kernels.fused_add_layer_norm, (*residual, weight, bias, eps))
            with graph.inserting_after(both):
                summed = graph.call_function(operator.getitem, (both, 1))
            with graph.inserting_after(summed):
                fused = graph.call_function(operator.getitem, (both, 0))
            summed.meta.update(x.meta)
            fused.meta.update(node.meta)
            node.replace_all_uses_with(fused)
            x.replace_all_uses_with(summed)
            erase_dead(graph, [node, x])
        count += 1
    return count
