"""Indexing with a Python list of ints → indexing with a constant index tensor already on the device.

`x[..., [-2], :]` (Falcon's multi-query split of its fused QKV) makes PyTorch build a CPU index tensor and copy it
to the device on every call; inside CUDA-graph capture that copy is refused ("Cannot copy between CPU and CUDA
tensors during CUDA graph capture"), so such a model could not replay its steps. The list becomes a constant int64
tensor made once on the indexed tensor's device; the result is the same advanced indexing (a copy, as before).
Negative indices keep their meaning: advanced indexing wraps them against the dimension's size.
"""

from __future__ import annotations

import operator

import torch

from fastllm.passes._context import PassContext
from fastllm.passes._graph import fake, is_op, live_nodes

NAME = "list_index"
RUNS_AFTER: tuple[str, ...] = ()
RUNS_BEFORE: tuple[str, ...] = ()
RUNTIME_REQUIRED = True  # a graph the runtime replays must not copy from host memory


def pattern(x: torch.Tensor) -> torch.Tensor:
    return x[..., [-2], :]


def replacement(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x[..., index, :]


def _int_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value)


def apply(ctx: PassContext) -> int:
    graph = ctx.gm.graph
    count = 0
    for node in live_nodes(graph):
        if not is_op(node, "getitem") or len(node.args) != 2:
            continue
        source, index = node.args
        tensor = fake(source)
        if tensor is None:  # indexing a Python sequence (a tuple of outputs), not a tensor
            continue
        parts = index if isinstance(index, tuple) else (index,)
        if not any(_int_list(p) for p in parts):
            continue
        new_parts = []
        for part in parts:
            if _int_list(part):
                part = ctx.constant(torch.tensor(part, dtype=torch.long, device=tensor.device), before=node)
            new_parts.append(part)
        new_index = tuple(new_parts) if isinstance(index, tuple) else new_parts[0]
        with graph.inserting_before(node):
            replaced = graph.call_function(operator.getitem, (source, new_index))
        replaced.meta.update(node.meta)
        node.replace_all_uses_with(replaced)
        graph.erase_node(node)
        count += 1
    return count
