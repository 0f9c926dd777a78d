"""Rotary cos/sin from a table made once: `cos, sin = f(position_ids)` → `table[position_ids]`.

HF models compute their rotary cos and sin in every forward from the positions: a cast, inv_freq ⊗ positions (a
matmul), a cat, cos, sin, the attention scaling, two casts to the model's dtype. At batch-1 decode each of those is
a kernel launch of ~1-2 us in the CUDA graph, before the first layer can start (an H200 step timeline, 2026-12-01:
benchmarks/results/profile-*-timeline-20261201.json). This pass evaluates that subgraph once, with the graph's own
ops on the model's device, for every position the runtime can feed (0 .. max_model_len - 1), and replaces each of
its outputs by a gather of the table's rows: the same ops on the same inputs, so the same bits as computing them.

What is folded: the last computing call (not a view) of a chain that reads the positions input and otherwise only
constants (parameters, buffers), whose every use is a fastllm kernel, directly or through views (the rotary and
attention ops read cos and sin, each layer through its own `unsqueeze`), with at least two computing calls in the
chain and no embedding lookup (learned position embeddings are a table already). Outputs with equal tables (GLM
recomputes the same thing in every layer) share one table and one gather. Folding is only right when each row of
the output depends on its own position alone: a rope that looks at all positions at once (a scaled rope choosing
its frequencies by the longest position) would not be. So before replacing, the subgraph is run on probe positions
(a prefix, a scattered set, the last position alone) and the table's rows must equal its outputs bit for bit; any
difference leaves the graph as it was.

Measured on an H200 (2026-12-01, Llama-3.1-8B shape, batch-1 decode): the step's CUDA graph replays in 4086.5 us
against 4115.7 without this pass (benchmarks/replay_ab.py, three alternating rounds: W1-replay-ab-...-rope-table.json);
W1's tok/s, whose runs differ by ~1%, measured 242.5 against 239.7 and 237.2 against 238.5 in two calls.

Memory: a table holds max_model_len rows of each output (Llama-3.1-8B at its 131,072 positions: cos and sin
64 MiB in bf16); an output of more than _MAX_ROW_ELEMENTS values a position is not folded.
"""

from __future__ import annotations

import torch
from torch import fx

from fastllm.passes._context import PassContext
from fastllm.passes._graph import erase_dead, mutates

NAME = "rope_table"
RUNS_AFTER: tuple[str, ...] = ("rotary", "attention")  # the consumers are then fastllm's kernels
RUNS_BEFORE: tuple[str, ...] = ("reference_ops",)
RUNTIME_REQUIRED = False

_MAX_ROW_ELEMENTS = 4096  # values an output holds per position (cos and sin: the head dimension)
# Calls that only reshape or select: views of their input, no kernel of their own. A table stands in for the last
# computing call of a chain; the views after it (each layer's `cos.unsqueeze(1)`) stay, over the table's rows.
_VIEWS = {"getitem", "view", "reshape", "unsqueeze", "squeeze", "expand", "transpose", "permute", "size", "dim"}


def pattern(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """What this pass folds (Llama's rotary cos), written out in PyTorch."""
    freqs = (inv_freq[None, :, None] @ position_ids[:, None, :].float()).transpose(1, 2)
    return torch.cat((freqs, freqs), dim=-1).cos().to(torch.bfloat16)


def replacement(position_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """`table` is pattern() over every position 0..P-1 ([1, P, D]); the rows of the given positions."""
    return torch.index_select(table, 1, position_ids.reshape(-1))


def apply(ctx: PassContext) -> int:
    positions = ctx.positions
    if positions is None or not ctx.max_positions:
        return 0
    graph = ctx.gm.graph
    derived, reading = _position_only(ctx, positions)
    example = ctx.tensors[positions]
    table_positions = torch.arange(ctx.max_positions, device=example.device, dtype=example.dtype).view(1, -1)
    # Tables by content: layers that each recompute the same thing from the shared cos/sin (GLM's per-layer
    # repeat_interleave) share one table and one gather.
    groups: list[tuple[torch.Tensor, int, list[fx.Node]]] = []
    for node in derived:
        if node in reading and _name(node) not in _VIEWS and _feeds_kernels_only(node, reading) \
                and _worth_a_table(node, reading):
            table, dim = _table(ctx, derived, positions, node, table_positions)
            if table is None:
                continue
            same = next((g for g in groups if g[1] == dim and g[0].shape == table.shape and g[0].dtype == table.dtype
                         and torch.equal(g[0], table)), None)
            if same is None:
                groups.append((table, dim, [node]))
            else:
                same[2].append(node)
    if not groups:
        return 0
    order = {n: i for i, n in enumerate(graph.nodes)}

    def first_use(nodes: list[fx.Node]) -> fx.Node:
        return min((u for n in nodes for u in n.users), key=order.__getitem__)

    with graph.inserting_before(min((first_use(nodes) for _, _, nodes in groups), key=order.__getitem__)):
        flat = graph.call_method("reshape", (positions, -1))
    for table, dim, nodes in groups:
        before = first_use(nodes)
        table_node = ctx.constant(table, before=before)
        with graph.inserting_before(before):
            gathered = graph.call_function(torch.index_select, (table_node, dim, flat))
        for node in nodes:
            node.replace_all_uses_with(gathered)
    erase_dead(graph, derived)  # the folded chains (pure calls: none mutates, or it could not have been evaluated)
    return len(groups)  # tables made (each replacing one or more outputs)


def _position_only(ctx: PassContext, positions: fx.Node) -> tuple[list[fx.Node], set[fx.Node]]:
    """(the calls to evaluate, in graph order; those among them that read the positions). A call is evaluated when
    its inputs are the positions, constants (parameters and buffers: placeholders that are not the step's inputs;
    get_attr nodes) and calls evaluated before it: `inv_freq.to(device)` is one, reading no positions."""
    known = {n for n in ctx.gm.graph.nodes
             if n.op == "get_attr" or (n.op == "placeholder" and n in ctx.tensors and n not in ctx.step_inputs)}
    known.add(positions)
    evaluated: list[fx.Node] = []
    reading: set[fx.Node] = set()
    for node in ctx.gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or mutates(node) \
                or not all(i in known for i in node.all_input_nodes):
            continue
        known.add(node)
        evaluated.append(node)
        if any(i is positions or i in reading for i in node.all_input_nodes):
            reading.add(node)
    return evaluated, reading


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def _feeds_kernels_only(node: fx.Node, reading: set[fx.Node]) -> bool:
    """Whether every use of `node` is a fastllm kernel, directly or through views of it."""
    from fastllm.passes import FUSED_OPS

    def ends_in_kernels(n: fx.Node) -> bool:
        return bool(n.users) and all(
            (u.op == "call_function" and u.target in FUSED_OPS)
            or (u in reading and _name(u) in _VIEWS and ends_in_kernels(u)) for u in n.users)

    return ends_in_kernels(node)


def _worth_a_table(node: fx.Node, reading: set[fx.Node]) -> bool:
    """Whether the chain up to `node` has at least two position-reading calls that launch work (views do not) and
    no embedding lookup: learned position embeddings (GPT-2's) are a table already, which folding would copy."""
    behind, stack, seen = 0, [node], set()
    while stack:
        n = stack.pop()
        if n in seen or n not in reading:
            continue
        seen.add(n)
        if _name(n) == "embedding":
            return False
        behind += _name(n) not in _VIEWS
        stack.extend(n.all_input_nodes)
    return behind >= 2


@torch.no_grad()
def _evaluate(ctx: PassContext, derived: list[fx.Node], positions: fx.Node, output: fx.Node,
              value: torch.Tensor) -> torch.Tensor:
    """`output` computed from positions `value` by the graph's own calls (those in `derived`, in order)."""
    env: dict[fx.Node, object] = {positions: value}
    needed, stack = set(), [output]  # only what `output` reads (others, a P x P mask, could be huge)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)

    def load(n: fx.Node) -> object:
        if n in env:
            return env[n]
        if n.op == "get_attr":
            return getattr(ctx.gm, n.target)
        return ctx.tensors[n]

    for node in derived:
        if node not in needed:
            continue
        args = fx.map_arg(node.args, load)
        kwargs = fx.map_arg(node.kwargs, load)
        if node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            env[node] = node.target(*args, **kwargs)
        if node is output:
            break
    return env[output]


def _table(ctx: PassContext, derived: list[fx.Node], positions: fx.Node, output: fx.Node,
           table_positions: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """(the table of `output` over table_positions, the dim its positions run along), or (None, 0) if `output` is
    not a per-position function of the positions that the table reproduces bit for bit."""
    count = table_positions.shape[1]
    # Its size a position first, from a few positions: an output of P x P (a mask) over every position would take
    # max_model_len^2 elements (at 131,072 positions, more memory than the card has) before being refused.
    few = table_positions[:, : min(count, 3)]
    sample = _evaluate(ctx, derived, positions, output, few)
    if not isinstance(sample, torch.Tensor) or sample.numel() > _MAX_ROW_ELEMENTS * few.shape[1]:
        return None, 0
    table = _evaluate(ctx, derived, positions, output, table_positions)
    if not isinstance(table, torch.Tensor) or table.numel() > _MAX_ROW_ELEMENTS * count:
        return None, 0
    dims = [d for d, size in enumerate(table.shape) if size == count]
    if len(dims) != 1:
        return None, 0
    dim = dims[0]
    last = count - 1
    probes = [list(range(min(count, 7))), sorted({0, last, last // 2, last // 3, min(5, last)}, reverse=True), [last]]
    for probe in probes:
        p = torch.tensor(probe, device=table_positions.device, dtype=table_positions.dtype).view(1, -1)
        expected = _evaluate(ctx, derived, positions, output, p)
        got = torch.index_select(table, dim, p.reshape(-1))
        if not isinstance(expected, torch.Tensor) or expected.shape != got.shape or expected.dtype != got.dtype \
                or not torch.equal(expected, got):
            return None, 0
    return table.contiguous(), dim
