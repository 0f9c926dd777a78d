"""RMSNorm (optionally with the residual add before it) → one `fastllm.kernels` call.

Matches the chain every RMSNorm module in transformers writes, anchored on `rsqrt`:

    h = x.to(float32)                          # or x.float(), or no upcast
    h = h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = w * h.to(x.dtype)                    # Llama/Mistral/Qwen: cast, then weight
    out = (h * (1.0 + w.float())).type_as(x)   # Gemma: (1 + w) in fp32, then cast

When `x` is itself `a + b` (the residual stream), the add is fused too and the kernel returns both the
normalized output and the sum, which the rest of the graph keeps using as the residual.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from fastllm import kernels
from fastllm.passes._context import PassContext
from fastllm.passes._graph import (
    arg,
    erase_dead,
    fake,
    is_cast,
    is_float32_upcast,
    is_last_dim,
    is_op,
    live_nodes,
    only_user,
    other_operand,
    scalar_operand,
)

NAME = "rms_norm"
RUNS_AFTER: tuple[str, ...] = ()
RUNS_BEFORE: tuple[str, ...] = ()
RUNTIME_REQUIRED = False


def pattern(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """What this pass matches (Llama's form), written out in PyTorch."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def replacement(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return kernels.rms_norm(x, weight, eps)


@dataclass
class _Match:
    x: fx.Node            # the normalized input (before any upcast)
    weight: fx.Node
    eps: float
    weight_offset: float
    cast_before_weight: bool
    output: fx.Node       # the node whose value the fused op replaces
    nodes: list[fx.Node]  # every node of the matched chain


def match(rsqrt: fx.Node) -> _Match | None:
    if not is_op(rsqrt, "rsqrt") or not is_op(rsqrt.args[0], "add"):
        return None
    split = scalar_operand(rsqrt.args[0])
    if split is None or not is_op(split[0], "mean"):
        return None
    mean, eps = split
    if arg(mean, 2, "keepdim", False) is not True:
        return None
    square = mean.args[0]
    h = square.args[0] if is_op(square, "pow") and square.args[1:] == (2,) else None
    if h is None or not is_last_dim(arg(mean, 1, "dim"), None):
        return None
    normed = only_user(rsqrt)
    if normed is None or not is_op(normed, "mul") or other_operand(normed, rsqrt) is not h:
        return None
    x = h.args[0] if is_float32_upcast(h) else h
    if len(h.users) != 2 or len(normed.users) != 1:
        return None
    nodes = [h, square, mean, rsqrt.args[0], rsqrt, normed]
    if h is x:
        nodes.remove(h)
    tail = _match_weight(normed, x)
    if tail is None:
        return None
    weight, offset, cast_first, output, tail_nodes = tail
    return _Match(x, weight, eps, offset, cast_first, output, nodes + tail_nodes)


def _match_weight(normed: fx.Node, x: fx.Node):
    user = only_user(normed)
    # Llama: weight * normed.to(x.dtype)
    if is_cast(user) and not is_op(user, "type_as"):
        scale = only_user(user)
        if is_op(scale, "mul") and user.users.keys() == {scale}:
            weight = other_operand(scale, user)
            if _is_weight(weight, x):
                return weight, 0.0, True, scale, [user, scale]
        return None
    # Gemma: (normed * (1.0 + weight.float())).type_as(x)
    if is_op(user, "mul"):
        plus_one = other_operand(user, normed)
        split = scalar_operand(plus_one) if is_op(plus_one, "add") else None
        if split is None:
            return None
        weight_node, offset = split
        nodes = [plus_one, user]
        if is_float32_upcast(weight_node):
            nodes.insert(0, weight_node)
            weight_node = weight_node.args[0]
        cast = only_user(user)
        if _is_weight(weight_node, x) and is_cast(cast):
            return weight_node, offset, False, cast, nodes + [cast]
    return None


def _is_weight(node: object, x: fx.Node) -> bool:
    w, t = fake(node), fake(x)
    return w is not None and t is not None and w.dim() == 1 and w.shape[0] == t.shape[-1]


def _residual_operands(x: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) when x = a + b over two tensors of x's shape and dtype: the fusable residual add."""
    if not is_op(x, "add") or len(x.args) != 2 or x.kwargs:
        return None
    a, b = x.args
    fx_, fa, fb = fake(x), fake(a), fake(b)
    if fa is None or fb is None or fx_ is None:
        return None
    if not (fa.shape == fb.shape == fx_.shape and fa.dtype == fb.dtype == fx_.dtype):
        return None
    return a, b


def apply(ctx: PassContext) -> int:
    graph = ctx.gm.graph
    count = 0
    for node in live_nodes(graph):
        m = match(node)
        if m is None:
            continue
        options = {"weight_offset": m.weight_offset, "cast_before_weight": m.cast_before_weight}
        residual = _residual_operands(m.x)
        with graph.inserting_after(m.x):
            if residual is None:
                fused = graph.call_function(kernels.rms_norm, (m.x, m.weight, m.eps), options)
                m.output.replace_all_uses_with(fused)
            else:
                both = graph.call_function(kernels.fused_add_rms_norm, (*residual, m.weight, m.eps), options)
                with graph.inserting_after(both):
                    summed = graph.call_function(operator.getitem, (both, 1))
                with graph.inserting_after(summed):
                    fused = graph.call_function(operator.getitem, (both, 0))
                summed.meta.update(m.x.meta)
                m.output.replace_all_uses_with(fused)
                m.x.replace_all_uses_with(summed)
                m.nodes.append(m.x)
        fused.meta.update(m.output.meta)
        erase_dead(graph, reversed(m.nodes))
        count += 1
    return count
