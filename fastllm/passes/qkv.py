"""Projections sharing one input (Q, K and V) → one GEMM on merged weights, then slices.

Generic over architectures: any group of two or more `linear` calls on the same input node, with
parameter weights of one dtype and in-features, all with or all without a bias, becomes one linear. It runs
after the gated-MLP pass, so gate/up pairs have already become gate_up GEMMs and are not merged here.
The outputs become views `out[..., a:b]` of the merged GEMM's result; transformers' attention code
reshapes them with `.view(*shape, -1, head_dim)`, which is valid on such a view because only the last
(contiguous) dim is split.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import fx

from fastllm.passes._context import PassContext
from fastllm.passes._graph import arg, erase_dead, is_op

NAME = "qkv"
# After gated_mlp: this pass merges any linears sharing an input, so it would take gate/up first and leave
# a plain merged linear that gated_mlp no longer matches. (skinny_linear declares it runs after this pass.)
RUNS_AFTER: tuple[str, ...] = ("gated_mlp",)
RUNS_BEFORE: tuple[str, ...] = ()
RUNTIME_REQUIRED = False


def pattern(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor):
    """What this pass matches, written out in PyTorch."""
    return F.linear(x, w_q), F.linear(x, w_k), F.linear(x, w_v)


def replacement(x: torch.Tensor, w_qkv: torch.Tensor, sizes: list[int]):
    return F.linear(x, w_qkv).split(sizes, dim=-1)


def _groups(ctx: PassContext) -> list[list[fx.Node]]:
    # Keyed by (input, has bias): GPT-J feeds Q/K/V (no bias) and fc_in (bias) from one norm output.
    by_input: dict[tuple[fx.Node, bool], list[fx.Node]] = defaultdict(list)
    for node in ctx.gm.graph.nodes:
        weight = ctx.tensor(arg(node, 1, "weight")) if is_op(node, "linear") else None
        if weight is not None and isinstance(node.args[0], fx.Node):
            by_input[node.args[0], arg(node, 2, "bias") is not None].append(node)
    groups = []
    for nodes in by_input.values():
        if len(nodes) < 2:
            continue
        weights = [ctx.tensor(arg(n, 1, "weight")) for n in nodes]
        biases = [arg(n, 2, "bias") for n in nodes]
        same = all(w.dtype == weights[0].dtype and w.dim() == 2 and w.shape[1] == weights[0].shape[1] for w in weights)
        bias_ok = all(b is None for b in biases) or all(ctx.tensor(b) is not None for b in biases)
        if same and bias_ok:
            groups.append(nodes)
    return groups


def apply(ctx: PassContext) -> int:
    graph = ctx.gm.graph
    count = 0
    for nodes in _groups(ctx):
        first, x = nodes[0], nodes[0].args[0]
        weights = [ctx.tensor(arg(n, 1, "weight")) for n in nodes]
        biases = [ctx.tensor(arg(n, 2, "bias")) for n in nodes]
        weight = ctx.constant(ctx.merger.merge(weights), before=first)
        bias = ctx.constant(ctx.merger.merge(biases), before=first) if biases[0] is not None else None
        with graph.inserting_before(first):
            merged = graph.call_function(F.linear, (x, weight, bias))
        start = 0
        for node, w in zip(nodes, weights):
            stop = start + w.shape[0]
            with graph.inserting_after(merged):
                part = graph.call_function(operator.getitem, (merged, (Ellipsis, slice(start, stop))))
            part.meta.update(node.meta)
            node.replace_all_uses_with(part)
            start = stop
        erase_dead(graph, nodes)
        count += 1
    return count
