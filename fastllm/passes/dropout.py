"""Dropout in eval mode → removed.

Models built for training keep `F.dropout(x, p, training=False)` calls in their forward; at inference
they are identities, and leaving them in the graph would hide the patterns around them (GPT-2's
residual add goes through one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllm.passes._context import PassContext
from fastllm.passes._graph import arg, is_op

NAME = "dropout"
# First: an eval-mode dropout is an identity that can sit inside any chain another pass matches (GPT-2's
# residual add goes through one, eager attention's probabilities through another).
RUNS_AFTER: tuple[str, ...] = ()
RUNS_BEFORE: tuple[str, ...] = ("list_index", "rms_norm", "layer_norm", "rotary", "gated_mlp", "qkv", "attention",
                                 "skinny_linear")
RUNTIME_REQUIRED = False


def pattern(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p, training=False)


def replacement(x: torch.Tensor, p: float) -> torch.Tensor:
    return x


def apply(ctx: PassContext) -> int:
    graph = ctx.gm.graph
    count = 0
    for node in list(graph.nodes):
        if is_op(node, "dropout") and arg(node, 2, "training", True) is False and not arg(node, 3, "inplace", False):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            count += 1
    return count
