"""Rotary position embedding → one kernel call per rotated tensor.

Matches `x * cos + rotate(x) * sin` in both layouts transformers uses:

    neox (Llama, Mistral, Qwen, Gemma, Phi, NeoX):  rotate(x) = cat((-x[..., d/2:], x[..., :d/2]), -1)
    gptj (GPT-J, interleaved pairs):                 rotate(x) = stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)

Partial rotary (Phi, NeoX) rotates `x = q[..., :r]` and then writes `cat((rotated, q[..., r:]), -1)`; that
cat is absorbed as well, since the kernel copies the pass-through tail itself.
"""

from __future__ import annotations

import torch
from torch import fx

from fastllm import kernels
from fastllm.passes._context import PassContext
from fastllm.passes._graph import (
    arg,
    erase_dead,
    fake,
    is_last_dim,
    is_op,
    last_dim_slice,
    live_nodes,
    only_user,
    other_operand,
)

NAME = "rotary"
RUNS_AFTER: tuple[str, ...] = ()
RUNS_BEFORE: tuple[str, ...] = ()  # attention declares it runs after this one
RUNTIME_REQUIRED = False


def pattern(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """What this pass matches (neox layout), written out in PyTorch."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def replacement(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return kernels.rotary_embedding(x, cos, sin, interleaved=False)


def _rotate_source(rot: object) -> tuple[fx.Node, bool, list[fx.Node]] | None:
    """(x, interleaved, nodes) when `rot` is rotate(x) in the neox or gptj layout."""
    if is_op(rot, "cat"):
        parts = arg(rot, 0, "tensors")
        if not (is_last_dim(arg(rot, 1, "dim", 0), _ndim(rot)) and isinstance(parts, (list, tuple))
                and len(parts) == 2 and is_op(parts[0], "neg")):
            return None
        upper, lower = parts[0].args[0], parts[1]
        x = lower.args[0] if is_op(lower, "getitem") else None
        d = _last(x)
        if d is None or d % 2 or last_dim_slice(upper, x) != (d // 2, None, None):
            return None
        if last_dim_slice(lower, x) not in ((None, d // 2, None), (0, d // 2, None)):
            return None
        return x, False, [upper, parts[0], lower, rot]
    if is_op(rot, "flatten"):
        stack = rot.args[0]
        if arg(rot, 1, "start_dim", 0) != -2 or not is_op(stack, "stack"):
            return None
        parts = arg(stack, 0, "tensors")
        if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and is_op(parts[0], "neg")
                and arg(stack, 1, "dim", 0) == -1):
            return None
        odd, even = parts[0].args[0], parts[1]
        x = even.args[0] if is_op(even, "getitem") else None
        if x is None or last_dim_slice(odd, x) != (1, None, 2) or last_dim_slice(even, x) not in (
                (None, None, 2), (0, None, 2)):
            return None
        return x, True, [odd, parts[0], even, stack, rot]
    return None


def _ndim(node: object) -> int | None:
    t = fake(node)
    return t.dim() if t is not None else None


def _last(node: object) -> int | None:
    t = fake(node)
    return int(t.shape[-1]) if t is not None else None


def match(add: fx.Node):
    """(x, cos, sin, interleaved, nodes) for `x * cos + rotate(x) * sin`."""
    if not is_op(add, "add") or len(add.args) != 2:
        return None
    for plain, rotated in (add.args, reversed(add.args)):
        if not (is_op(plain, "mul") and is_op(rotated, "mul")):
            continue
        for rot in rotated.args:
            found = _rotate_source(rot)
            if found is None:
                continue
            x, interleaved, nodes = found
            cos, sin = other_operand(plain, x), other_operand(rotated, rot)
            if not _broadcasts_to(cos, x) or not _broadcasts_to(sin, x):
                continue
            if any(len(n.users) != 1 for n in nodes[:-1]) or len(rot.users) != 1 or len(plain.users) != 1:
                continue
            return x, cos, sin, interleaved, nodes + [plain, rotated, add]
    return None


def _broadcasts_to(small: object, x: fx.Node) -> bool:
    s, t = fake(small), fake(x)
    if s is None or t is None:
        return False
    try:
        return tuple(torch.broadcast_shapes(s.shape, t.shape)) == tuple(t.shape) and s.shape[-1] == t.shape[-1]
    except RuntimeError:
        return False


def _absorb_partial(x: fx.Node, add: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(q, cat, tail) when x = q[..., :r] and the rotated part is re-joined as cat((rotated, q[..., r:]), -1)."""
    cat = only_user(add)
    if not is_op(x, "getitem") or not is_op(cat, "cat"):
        return None
    q = x.args[0]
    r = _last(x)
    parts = arg(cat, 0, "tensors")
    if last_dim_slice(x, q) not in ((None, r, None), (0, r, None)) or not isinstance(parts, (list, tuple)):
        return None
    if len(parts) != 2 or parts[0] is not add or last_dim_slice(parts[1], q) != (r, None, None):
        return None
    if not is_last_dim(arg(cat, 1, "dim", 0), _ndim(cat)):
        return None
    return q, cat, parts[1]


def apply(ctx: PassContext) -> int:
    graph = ctx.gm.graph
    count = 0
    for node in live_nodes(graph):
        m = match(node)
        if m is None:
            continue
        x, cos, sin, interleaved, nodes = m
        source, output = x, node
        partial = _absorb_partial(x, node)
        if partial is not None:
            source, output, tail = partial
            nodes += [output, tail]
        with graph.inserting_before(output):
            fused = graph.call_function(kernels.rotary_embedding, (source, cos, sin), {"interleaved": interleaved})
        fused.meta.update(output.meta)
        output.replace_all_uses_with(fused)
        erase_dead(graph, reversed(nodes + [x]))
        count += 1
    return count
