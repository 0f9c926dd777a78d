"""Gated MLP: `act(gate(x)) * up(x)` → one gate_up GEMM + one fused activation-and-multiply kernel.

Two spellings are matched:
- separate projections (Llama, Mistral, Qwen, Gemma): `act(linear(x, Wg)) * linear(x, Wu)`; the weights
  are merged once into `[Wg; Wu]` (see `WeightMerger`: the originals become views, no extra memory);
- an already merged projection (Phi-3): `g, u = linear(x, W).chunk(2, -1); u * act(g)`.
The activation is SiLU or GELU (exact or tanh-approximated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from fastllm import kernels
from fastllm.passes._context import PassContext
from fastllm.passes._graph import arg, erase_dead, fake, is_last_dim, is_op, live_nodes, other_operand

NAME = "gated_mlp"
RUNS_AFTER: tuple[str, ...] = ()
RUNS_BEFORE: tuple[str, ...] = ()  # qkv and skinny_linear declare they run after this one
RUNTIME_REQUIRED = False


def pattern(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """What this pass matches (SiLU, separate projections), written out in PyTorch."""
    return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)


def replacement(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    return kernels.silu_and_mul(F.linear(x, w_gate_up))


@dataclass
class _Match:
    act: fx.Node
    gate: fx.Node
    up: fx.Node
    output: fx.Node


def _activation(node: fx.Node):
    """(kernel, kwargs) for a supported activation node, else None."""
    if is_op(node, "silu"):
        return kernels.silu_and_mul, {}
    if is_op(node, "gelu"):
        approximate = arg(node, 1, "approximate", "none")
        if approximate in ("none", "tanh"):
            return kernels.gelu_and_mul, {"approximate": approximate}
    return None


def match(mul: fx.Node) -> _Match | None:
    if not is_op(mul, "mul") or len(mul.args) != 2:
        return None
    for act in mul.args:
        if isinstance(act, fx.Node) and _activation(act) is not None and len(act.users) == 1:
            up = other_operand(mul, act)
            gate = act.args[0]
            if isinstance(up, fx.Node) and isinstance(gate, fx.Node) and len(gate.users) == 1:
                return _Match(act, gate, up, mul)
    return None


def _chunked_source(gate: fx.Node, up: fx.Node) -> fx.Node | None:
    """L when gate, up = L.chunk(2, dim=-1)[0], [1]."""
    if not (is_op(gate, "getitem") and is_op(up, "getitem")) or gate.args[0] is not up.args[0]:
        return None
    chunk = gate.args[0]
    if not is_op(chunk, "chunk") or gate.args[1] != 0 or up.args[1] != 1 or len(chunk.users) != 2:
        return None
    if arg(chunk, 1, "chunks") != 2 or not is_last_dim(arg(chunk, 2, "dim", 0), _ndim(chunk.args[0])):
        return None
    return chunk.args[0]


def _ndim(node: object) -> int | None:
    t = fake(node)
    return t.dim() if t is not None else None


def _separate_projections(ctx: PassContext, gate: fx.Node, up: fx.Node):
    """(x, [Wg, Wu], [bg, bu] or None) for two linears on one input with parameter weights."""
    if not (is_op(gate, "linear") and is_op(up, "linear")) or gate.args[0] is not up.args[0] or len(up.users) != 1:
        return None
    weights = [ctx.tensor(arg(n, 1, "weight")) for n in (gate, up)]
    biases = [arg(n, 2, "bias") for n in (gate, up)]
    if any(w is None for w in weights) or weights[0].shape != weights[1].shape or weights[0].dtype != weights[1].dtype:
        return None
    if all(b is None for b in biases):
        return gate.args[0], weights, None
    bias_tensors = [ctx.tensor(b) for b in biases]
    if any(b is None for b in bias_tensors):
        return None
    return gate.args[0], weights, bias_tensors


def apply(ctx: PassContext) -> int:
    graph = ctx.gm.graph
    count = 0
    for node in live_nodes(graph):
        m = match(node)
        if m is None:
            continue
        kernel, options = _activation(m.act)
        dead = [m.output, m.act]
        source = _chunked_source(m.gate, m.up)
        if source is not None:
            dead += [m.gate, m.up, m.gate.args[0]]
        else:
            found = _separate_projections(ctx, m.gate, m.up)
            if found is None:
                continue
            x, weights, biases = found
            weight = ctx.constant(ctx.merger.merge(weights), before=m.output)
            bias = ctx.constant(ctx.merger.merge(biases), before=m.output) if biases else None
            with graph.inserting_before(m.output):
                source = graph.call_function(F.linear, (x, weight, bias))
            dead += [m.gate, m.up]
        with graph.inserting_before(m.output):
            fused = graph.call_function(kernel, (source,), options)
        fused.meta.update(m.output.meta)
        m.output.replace_all_uses_with(fused)
        erase_dead(graph, dead)
        count += 1
    return count
