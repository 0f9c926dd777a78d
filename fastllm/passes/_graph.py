"""Small helpers for matching and rewriting dynamo-captured torch.fx graphs.

Dynamo records torch-level calls as written in the model's Python: the same operation can appear as a
function (`torch.mul`, `operator.mul`) or a method (`x.mul(...)`). `op_name()` maps all spellings onto one
canonical name so the passes can match on meaning rather than on how one model happened to write it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

_FUNCTIONS: dict[Any, str] = {
    operator.add: "add", torch.add: "add",
    operator.mul: "mul", torch.mul: "mul",
    operator.neg: "neg", torch.neg: "neg",
    operator.pow: "pow", torch.pow: "pow",
    operator.getitem: "getitem",
    torch.rsqrt: "rsqrt", torch.mean: "mean",
    torch.cat: "cat", torch.concat: "cat", torch.stack: "stack", torch.flatten: "flatten",
    torch.chunk: "chunk", torch.split: "split",
    F.linear: "linear", torch._C._nn.linear: "linear",
    F.silu: "silu", F.gelu: "gelu", torch._C._nn.gelu: "gelu",
    F.layer_norm: "layer_norm", torch.layer_norm: "layer_norm",
    F.dropout: "dropout", torch.dropout: "dropout",
    F.embedding: "embedding", torch.embedding: "embedding",
    # Attention written out by hand (eager_attention.py).
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "bmm", torch.baddbmm: "baddbmm",
    F.softmax: "softmax", torch.softmax: "softmax", torch.tanh: "tanh", operator.truediv: "div", torch.div: "div",
    torch.where: "where", torch.masked_fill: "masked_fill",
}
_METHODS = {"add", "mul", "neg", "pow", "rsqrt", "mean", "chunk", "split", "flatten", "to", "float", "type_as",
            "matmul", "bmm", "baddbmm", "softmax", "tanh", "div", "masked_fill", "transpose", "reshape", "view",
            "type", "contiguous"}


def op_name(node: Any) -> str | None:
    """Canonical name of what `node` computes, or None for placeholders, outputs and unknown calls."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method" and node.target in _METHODS:
        return node.target
    return None


def is_op(node: Any, *names: str) -> bool:
    return op_name(node) in names


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `index`/`name` of a call, whether it was passed positionally or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def fake(node: Any) -> torch.Tensor | None:
    """The fake tensor dynamo recorded for `node` (shape, dtype, device), if any."""
    if isinstance(node, fx.Node):
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            return value
    return None


def is_float32_upcast(node: Any) -> bool:
    """`x.to(torch.float32)` / `x.float()` / `x.to(dtype=torch.float32)`."""
    if is_op(node, "float"):
        return True
    if not is_op(node, "to"):
        return False
    dtypes = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, torch.dtype)]
    return dtypes == [torch.float32]


def is_cast(node: Any) -> bool:
    """A dtype conversion without a device move: `.to(dtype)`, `.float()`, `.type_as(other)`."""
    if is_op(node, "float", "type_as"):
        return True
    if not is_op(node, "to"):
        return False
    rest = list(node.args[1:]) + list(node.kwargs.values())
    return len(rest) == 1 and isinstance(rest[0], torch.dtype)


def scalar_operand(node: fx.Node) -> tuple[fx.Node, float] | None:
    """For `a + c` / `c + a` with a Python number c: (a, c)."""
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
    if isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return a, float(b)
    if isinstance(b, fx.Node) and isinstance(a, (int, float)) and not isinstance(a, bool):
        return b, float(a)
    return None


def other_operand(node: fx.Node, known: fx.Node) -> Any:
    """The operand of a binary op that is not `known` (None if `known` is not an operand)."""
    a, b = node.args[0], node.args[1]
    if a is known:
        return b
    if b is known:
        return a
    return None


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def is_last_dim(dim: Any, ndim: int | None) -> bool:
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    return dim == -1 or (ndim is not None and dim == ndim - 1)


def last_dim_slice(node: Any, source: fx.Node) -> tuple[int | None, int | None, int | None] | None:
    """For `source[..., a:b:c]` (or `source[:, :, a:b:c]` spelling every leading dim): (a, b, c)."""
    if not is_op(node, "getitem") or node.args[0] is not source:
        return None
    index = node.args[1]
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return None
    lead = index[:-1]
    full = slice(None, None, None)
    if lead == (Ellipsis,) or (lead and all(i == full for i in lead) and _ndim(source) == len(index)):
        s = index[-1]
        return s.start, s.stop, s.step
    return None


def _ndim(node: fx.Node) -> int | None:
    t = fake(node)
    return t.dim() if t is not None else None


def live_nodes(graph: fx.Graph) -> Iterable[fx.Node]:
    """The graph's nodes, in order, skipping those an earlier rewrite in the same walk has erased.

    A pass walks a snapshot of the node list while it rewrites; fx marks erased nodes `_erased` and they must
    not be matched again.
    """
    for node in list(graph.nodes):
        if not getattr(node, "_erased", False):
            yield node


def erase_dead(graph: fx.Graph, nodes: Iterable[fx.Node]) -> None:
    """Erase the given nodes once nothing uses them, latest first.

    Only nodes a pass replaced are erased: graph-wide dead-code elimination could drop in-place cache
    writes that look unused.
    """
    pending = [n for n in nodes if n.graph is graph]
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if not node.users and node.op not in ("placeholder", "output"):
                graph.erase_node(node)
                pending.remove(node)
                changed = True


# The operator module's in-place forms (`a += b` is `operator.iadd`) and its mutating item functions.
_OPERATOR_MUTATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.setitem, operator.delitem}


# The same forms as tensor methods (`x.__iadd__(y)`, `x.__setitem__(i, v)`): of the dunder methods only these mutate.
_DUNDER_MUTATORS = {f"__{f.__name__.strip('_')}__" for f in _OPERATOR_MUTATORS}


def mutates(node: fx.Node) -> bool:
    """Whether a call may change its arguments or the world: in-place methods (`x.add_(...)`), torch functions with
    a trailing underscore, the operator module's in-place forms, and what fx marks impure. `operator.and_` is `&`,
    a pure function despite its underscore, and `x.__eq__(y)` a pure method despite its trailing underscores (dynamo
    records `a == b` between tensors so: HF's packed-sequence mask ends in one)."""
    if node.op == "call_method":
        if node.target.startswith("__") and node.target.endswith("__"):
            return node.target in _DUNDER_MUTATORS
        return node.target.endswith("_")
    if node.op != "call_function":
        return False
    if getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return node.target in _OPERATOR_MUTATORS
    return node.is_impure() or getattr(node.target, "__name__", "").endswith("_")


def eliminate_dead_code(graph: fx.Graph) -> int:
    """Erase calls whose results nothing uses, except those that may mutate (see `mutates`).

    `fx.Graph.eliminate_dead_code` treats every method call as pure, which would drop in-place updates.
    """
    erased = 0
    for node in reversed(list(graph.nodes)):
        if node.users or node.op not in ("call_function", "call_method") or mutates(node):
            continue
        graph.erase_node(node)
        erased += 1
    return erased
