"""Recognise attention written out by hand ("eager" attention) in a captured graph, for the attention pass.

Models whose attention is not an SDPA call (Bloom, MPT; Gemma-2, whose transformers code picks eager attention
for its logit soft-capping) spell it as a chain of tensor ops. From the softmax, this module walks back to the
q·kᵀ product and forward to the product with v:

    s = q @ kᵀ  (matmul / bmm, or baddbmm(bias, q, kᵀ, alpha=a))
    s = s * a, s / a                     any number of constant factors: the scale
    s = c * tanh(s / c)                  at most once: logit soft-capping
    s = s + mask, s.masked_fill(m, x)    masks and position biases (ALiBi), last
    p = softmax(s, -1)  [.to / .float / view]
    out = p @ v  (matmul / bmm)

q, k and v may arrive as [B * H, S, D] reshapes of [B, H, S, D] tensors (Bloom); the match returns the 4-D
tensors, since the runtime's batch is one flattened row (B = 1). Masks need no matching: the runtime's metadata
says which positions a token sees. Additive terms are either masks or the ALiBi bias, which the model's config
declares (models/attention.py): one that is neither is left alone, and the attention then stays unmatched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from fastllm.passes._graph import fake, op_name

_PASS_THROUGH = {"to", "float", "type", "view", "reshape", "contiguous"}  # between softmax and p @ v
# What masks are built from (looks_like_mask): comparisons and logic on positions (bool results), constants, and
# ops that only reshape or combine masks.
_COMPARISONS = {"lt", "le", "gt", "ge", "eq", "ne", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__",
                "logical_and", "logical_or", "and_", "or_", "__and__", "__or__", "bitwise_and", "bitwise_or",
                "logical_not", "invert", "__invert__"}
_CONSTANTS = {"full", "zeros", "ones", "empty", "full_like", "zeros_like", "ones_like", "new_full", "new_zeros",
              "new_ones", "scalar_tensor", "tensor"}
_MASK_COMBINERS = {"to", "float", "type", "type_as", "view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze",
                   "getitem", "contiguous", "clone", "add", "sub", "mul", "neg", "cat", "repeat", "triu", "tril",
                   "clamp", "minimum", "maximum", "flatten", "permute", "transpose", "__getitem__"}


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class EagerAttention:
    q: fx.Node                      # [B, Hq, S, D]
    k: fx.Node                      # [B, Hkv or Hq, S, D] (possibly repeated: the pass undoes repeat_kv)
    v: fx.Node
    output: fx.Node                 # p @ v, whose users take the fused attention instead
    scale: float = 1.0
    softcap: float | None = None
    additive: list[fx.Node] = field(default_factory=list)  # masks and biases added to the scores
    replaced: list[fx.Node] = field(default_factory=list)  # the chain's nodes, for erasing once unused


def looks_like_mask(node: object, limit: int = 4000) -> bool:
    """Whether `node` only masks: its values are constants picked by conditions on positions. Bool tensors and
    comparisons are masks; `where` / `masked_fill` are masks when what they select from is (a constant, or a mask);
    reshapes, sums and products of masks are masks. A float that flows in from any other arithmetic (positions
    times slopes: a bias) is not, even through a masked_fill: Falcon folds its ALiBi into the mask that way, and
    dropping it as "just a mask" would change the model's output."""
    memo: dict[fx.Node, bool] = {}

    def visit(current: object) -> bool:
        if not isinstance(current, fx.Node):
            return True  # a Python scalar (a fill value, min(dtype))
        if current in memo:
            return memo[current]
        if len(memo) > limit:
            return False
        memo[current] = False  # cycles cannot occur in a graph; this only bounds re-entry
        value = fake(current)
        name = current.target if current.op == "call_method" else getattr(current.target, "__name__", "")
        if (value is not None and value.dtype == torch.bool) or name in _COMPARISONS or name in _CONSTANTS:
            result = True
        elif name in ("masked_fill", "masked_fill_"):
            result = visit(current.args[0])  # the filled tensor; the condition is a mask by definition
        elif name == "where":
            result = all(visit(a) for a in current.args[1:3])
        elif name in _MASK_COMBINERS:
            result = all(visit(a) for a in current.all_input_nodes)
        else:
            result = False
        memo[current] = result
        return result

    return visit(node)


def _heads(node: fx.Node) -> fx.Node | None:
    """The [B, H, S, D] tensor behind `node`: itself, or the input of a reshape/view to [B * H, S, D]."""
    value = fake(node)
    if value is None:
        return None
    if value.dim() == 4:
        return node
    if value.dim() == 3 and op_name(node) in ("reshape", "view"):
        source = node.args[0]
        inner = fake(source)
        if inner is not None and inner.dim() == 4 and inner.shape[0] * inner.shape[1] == value.shape[0]:
            return source
    return None


def _key(k_transposed: object) -> fx.Node | None:
    """k for kᵀ = k.transpose(-1, -2) (or (2, 3) / (1, 2) on 4-D / 3-D tensors)."""
    if op_name(k_transposed) != "transpose":
        return None
    source = k_transposed.args[0]
    value = fake(source)
    if value is None:
        return None
    dims = sorted(d % value.dim() for d in k_transposed.args[1:3])
    return source if dims == [value.dim() - 2, value.dim() - 1] else None


def _softcap(node: fx.Node) -> tuple[fx.Node, float, list[fx.Node]] | None:
    """(x, c, nodes) for `tanh(x / c) * c` (either operand order of the product)."""
    if op_name(node) != "mul":
        return None
    a, b = node.args[0], node.args[1]
    tanh, c = (a, _number(b)) if op_name(a) == "tanh" else (b, _number(a))
    if op_name(tanh) != "tanh" or c is None:
        return None
    inner = tanh.args[0]
    if op_name(inner) != "div" or _number(inner.args[1]) != c:
        return None
    return inner.args[0], c, [node, tanh, inner]


def match(softmax: fx.Node) -> EagerAttention | None:
    """The attention around `softmax`, or None if it is not the chain above."""
    if op_name(softmax) != "softmax":
        return None
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    if dim not in (-1, 3):
        return None
    found = EagerAttention(q=None, k=None, v=None, output=None)  # type: ignore[arg-type]
    # Output side: softmax → casts / views → p @ v.
    p = softmax
    chain = [softmax]
    while True:
        users = list(p.users)
        if len(users) != 1:
            return None
        user = users[0]
        if op_name(user) in ("matmul", "bmm") and user.args[0] is p:
            found.output, v = user, user.args[1]
            break
        if op_name(user) not in _PASS_THROUGH:
            return None
        chain.append(user)
        p = user
    # Input side: masks and biases, then at most one soft-cap, then constant factors, then q @ kᵀ.
    s = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
    stage = 0  # 0: masks/biases, 1: after the soft-cap, 2: factors
    while True:
        name = op_name(s)
        if name in ("to", "float", "type", "view") and stage == 0:
            chain.append(s)
            s = s.args[0]
        elif name == "add" and stage == 0:
            a, b = s.args[0], s.args[1]
            score, term = (a, b) if _leads_to_scores(a) else (b, a)
            if not isinstance(term, fx.Node):
                return None
            found.additive.append(term)
            chain.append(s)
            s = score
        elif name == "masked_fill" and stage == 0:
            found.additive.append(s.args[1])
            chain.append(s)
            s = s.args[0]
        elif stage < 2 and (capped := _softcap(s)) is not None and stage <= 1:
            s, found.softcap, nodes = capped
            chain += nodes
            stage = 2
        elif name in ("mul", "div") and (factor := _number(s.args[1])) is not None:
            found.scale *= factor if name == "mul" else 1.0 / factor
            chain.append(s)
            s = s.args[0]
            stage = 2
        elif name in ("matmul", "bmm"):
            q, kt = s.args[0], s.args[1]
            chain.append(s)
            break
        elif name == "baddbmm":
            bias = s.args[0]
            q, kt = s.kwargs.get("batch1", s.args[1] if len(s.args) > 1 else None), s.kwargs.get(
                "batch2", s.args[2] if len(s.args) > 2 else None)
            beta, alpha = s.kwargs.get("beta", 1.0), s.kwargs.get("alpha", 1.0)
            if _number(beta) != 1.0 or _number(alpha) is None or stage != 0 or not isinstance(bias, fx.Node):
                return None
            found.scale *= float(alpha)
            found.additive.append(bias)
            chain.append(s)
            break
        else:
            return None
    k = _key(kt)
    if k is None:
        return None
    chain.append(kt)
    found.q, found.k, found.v = _heads(q), _heads(k), _heads(v)
    if found.q is None or found.k is None or found.v is None:
        return None
    found.replaced = chain + [n for n in (q, k, v) if n not in (found.q, found.k, found.v)]
    return found


def _leads_to_scores(node: object, depth: int = 8) -> bool:
    """Whether `node` is (a few elementwise steps after) a q·kᵀ product: the score side of an addition."""
    for _ in range(depth):
        name = op_name(node)
        if name in ("matmul", "bmm", "baddbmm"):
            return True
        if name in ("mul", "div", "tanh", "to", "float", "type", "view", "add", "masked_fill"):
            node = node.args[0]
            continue
        return False
    return False
