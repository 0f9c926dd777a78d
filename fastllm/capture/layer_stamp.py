"""Capture a deep model by tracing two of its decoder layers and stamping the second out for the others.

Dynamo's trace is most of a cold start (W3): on an H200's host, 14.5 s of `optimize()`'s 17.2 for the Llama-3.1-8B
shape (2026-12-02, profile-compiles-llama31_8b.json), about 0.2-0.3 s per decoder layer. The layers of most models
are one module class built from one config: their traced ops differ only in which parameters they read. So the
model is traced with its layer list cut to two layers (the first and the last), the two traced layers are checked
to be the same ops on corresponding inputs, and the graph is widened to every layer by copying the second layer's
nodes once per layer, each copy reading its own layer's parameters (by dynamo's source expression, with the layer
number replaced) and the output of the copy before it. The result is what a full trace would have given, in the
graph cache's form (placeholder sources): `capture()` then runs it as it runs a graph loaded from the cache.

Refused, so traced in full as before (`why_not` says why; `explain()` does not list it):
- no single layer list of `num_hidden_layers` modules, or fewer than three layers;
- layers of different classes, or whose submodules differ in any plain attribute other than their own index
  (sliding-window and full-attention layers, rope or no-rope layers, dense and MoE layers);
- a config list with one entry a layer whose entries differ (`layer_types`, `no_rope_layers`, ...);
- a trace whose two layers are not the same ops with the same constants (a layer index used in the arithmetic, as
  ChatGLM's query scaling does), ops between or after the layers that read the first layer's values, or
  placeholders without sources.
Tracing the first and the last layer (not the first two) also catches a forward that branches on the layer's
index against a threshold. What it cannot see is code inside a layer's forward that treats only some middle layers
differently by their index alone, with no attribute or config list saying so.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx

# Attributes holding a layer's own position: they differ between layers by construction, and (with no KV cache
# passed) a forward reads them only to pick its cache slot; a use in the arithmetic shows up as differing
# constants in the two traced layers, which refuses the stamp.
_INDEX_ATTRIBUTES = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx", "idx"})
_PLAIN = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class LayerStack:
    """Where a model's decoder layers are: `path` (dotted, from the model) of a ModuleList of `count` layers."""

    path: str
    count: int

    @property
    def parent_and_name(self) -> tuple[str, str]:
        parent, _, name = self.path.rpartition(".")
        return parent, name

    def source_marker(self, position: int) -> str:
        """How dynamo's source expression of a parameter of layer `position` spells the layer:
        `._modules['model']._modules['layers']._modules['3']`."""
        return "".join(f"._modules['{part}']" for part in self.path.split(".")) + f"._modules['{position}']"

    def stack_suffix(self, position: int) -> str:
        return f".{self.path}.{position}"


def find_layer_stack(model: torch.nn.Module) -> tuple[LayerStack | None, str | None]:
    """(the model's layer stack, None) if its layers can be stamped, else (None, why not)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 3:
        return None, "fewer than three layers (or no num_hidden_layers)"
    stacks = [(name, module) for name, module in model.named_modules()
              if isinstance(module, torch.nn.ModuleList) and len(module) == count and name]
    if len(stacks) != 1:
        return None, f"{len(stacks)} module lists of num_hidden_layers={count} modules, not one"
    path, layers = stacks[0]
    if len({type(layer) for layer in layers}) != 1:
        return None, "layers of different classes"
    first = _plain_attributes(layers[0])
    for position, layer in enumerate(layers):
        if _plain_attributes(layer) != first:
            return None, f"layer {position}'s attributes differ from layer 0's"
    for name, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == count and len({repr(v) for v in value}) > 1:
            return None, f"config.{name} differs between layers"
    return LayerStack(path, count), None


def _plain_attributes(layer: torch.nn.Module) -> list[tuple[str, str, object]]:
    """Every submodule's class and plain attributes (numbers, strings, tuples of them), its own index left out."""
    described = []
    for name, module in layer.named_modules():
        described.append((name, "class", f"{type(module).__module__}.{type(module).__qualname__}"))
        for key, value in sorted(vars(module).items()):
            if key.startswith("_") or key in _INDEX_ATTRIBUTES or key == "training":
                continue
            if isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
                described.append((name, key, value))
    return described


class LayerStamp:
    """A model whose capture stamps out its layers (capture(..., layers=)): what it did is kept on it, for the
    start-up report: `stamped` (the graph was widened from two layers) or `why_not` (traced in full)."""

    def __init__(self, model: torch.nn.Module, stack: LayerStack):
        self.model, self.stack = model, stack
        self.stamped = False
        self.why_not: str | None = None

    @contextlib.contextmanager
    def two_layers(self) -> Iterator[None]:
        """The model with its layer list cut to its first and last layers, for the trace; restored after."""
        parent_path, name = self.stack.parent_and_name
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        full = parent._modules[name]
        parent._modules[name] = torch.nn.ModuleList([full[0], full[self.stack.count - 1]])
        try:
            yield
        finally:
            parent._modules[name] = full


class StampRefused(Exception):
    """The two traced layers cannot be stamped out (why, in the message): trace the model in full."""


def stamp_layers(gm: fx.GraphModule, sources: list[str], stack: LayerStack) -> tuple[fx.GraphModule, list[str]]:
    """The graph (and placeholder sources) of the whole model, from `gm`, traced with the two layers of
    `two_layers`: layer 0 as traced, then the traced last layer once per position 1 .. count - 1.

    Raises StampRefused where the trace does not have the shape this needs."""
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != len(sources):
        raise StampRefused("placeholders and sources differ in number")
    source_of = dict(zip(placeholders, sources))
    layer_of = {n: _layer_position(n, source_of.get(n), stack) for n in nodes}
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    runs = [layer_of[n] for n in body]
    _hoist_shared(body, layer_of)
    first = [n for n in body if layer_of[n] == 0]
    second = [n for n in body if layer_of[n] == 1]
    if not first or not second:
        raise StampRefused("the trace has no ops in one of its two layers")
    start0, end0 = body.index(first[0]), body.index(first[-1])
    start1, end1 = body.index(second[0]), body.index(second[-1])
    if (set(runs[start0:end0 + 1]) != {0} or runs[start1:end1 + 1] != [1] * len(second)
            or runs[end0 + 1:start1] != [None] * (start1 - end0 - 1) or 0 in runs[end0 + 1:]):
        raise StampRefused("the two layers' ops are not two runs, one right after the other")
    params0 = {_relative(source_of[p], stack, 0): p for p in placeholders if layer_of[p] == 0}
    params1 = {_relative(source_of[p], stack, 1): p for p in placeholders if layer_of[p] == 1}
    if params0.keys() != params1.keys():
        raise StampRefused("the two layers read different parameters")
    carried = _match_layers(first, second, {params0[k]: params1[k] for k in params0}, layer_of)
    after = body[end1 + 1:] + [nodes[-1]]
    if any(layer_of.get(a) == 0 for n in after for a in n.all_input_nodes):
        raise StampRefused("ops after the layers read the first layer's values")

    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    new_sources: list[str] = []
    for p in placeholders:  # every traced placeholder, in order; then one set per stamped position
        copies[p] = graph.node_copy(p, lambda n: copies[n])
        new_sources.append(source_of[p])
    stamped_params: list[dict[fx.Node, fx.Node]] = []
    for position in range(2, stack.count):
        mapping = {}
        for key, p in params1.items():
            node = graph.placeholder(f"{p.name}_layer{position}")
            node.meta = dict(p.meta)
            node.meta.pop("grapharg", None)  # dynamo's record of the traced tensor: not this layer's
            mapping[p] = node
            new_sources.append(source_of[p].replace(stack.source_marker(1), stack.source_marker(position), 1))
        stamped_params.append(mapping)
    for n in body[:end1 + 1]:  # before the layers, layer 0, the traced last layer (position 1)
        copies[n] = graph.node_copy(n, lambda a: copies[a])
    previous = {n: copies[n] for n in second}  # the nodes of the copy before, by the traced last layer's node
    for mapping in stamped_params:
        current: dict[fx.Node, fx.Node] = {}

        def source(a: fx.Node, current=current, mapping=mapping) -> fx.Node:
            if a in current:
                return current[a]
            if a in mapping:
                return mapping[a]
            if layer_of.get(a) == 0:  # the traced last layer's input from layer 0: the copy before's output
                return previous[carried[a]]
            return copies[a]

        for n in second:
            current[n] = graph.node_copy(n, source)
        previous = current
    for n in after:  # the final norm, the head, the output: reading the last copy
        copies[n] = graph.node_copy(n, lambda a: previous.get(a, copies.get(a)))
    graph.lint()
    return fx.GraphModule(gm, graph), new_sources


def _hoist_shared(body: list[fx.Node], layer_of: dict[fx.Node, int | None]) -> None:
    """Count as outside the layers the first layer's values that do not depend on it (nor on its parameters) and
    that the second layer reads: dynamo computes a symbolic size once (MPT's ALiBi offsets, Mixtral's expert
    ranges) in the first layer that needs it, and later layers read that node. They are the same in every layer."""
    invariant: set[fx.Node] = set()
    for n in body:
        if layer_of[n] == 0 and all(layer_of.get(a) is None or a in invariant for a in n.all_input_nodes):
            invariant.add(n)
    read_later = {a for n in body if layer_of[n] == 1 for a in n.all_input_nodes if a in invariant}
    hoisted: set[fx.Node] = set()
    stack = list(read_later)
    while stack:  # what they read in the first layer moves out with them
        n = stack.pop()
        if n not in hoisted:
            hoisted.add(n)
            stack.extend(a for a in n.all_input_nodes if a in invariant)
    for n in hoisted:
        layer_of[n] = None


def _layer_position(node: fx.Node, source: str | None, stack: LayerStack) -> int | None:
    """0 or 1 for a node of the traced first or second layer (by its module stack, or its source for a
    placeholder), else None."""
    if node.op == "placeholder":
        if source is None:
            return None
        for position in (0, 1):
            if stack.source_marker(position) + "." in source:
                return position
        return None
    for path, *_ in (node.meta.get("nn_module_stack") or {}).values():
        path = re.sub(r"\[(\d+)\]", r".\1", str(path)).replace("['", ".").replace("']", "")
        for position in (0, 1):
            suffix = stack.stack_suffix(position)
            if path.endswith(suffix) or (suffix + ".") in path:
                return position
    return None


def _relative(source: str, stack: LayerStack, position: int) -> str:
    """A layer parameter's source after its layer's marker (`._modules['mlp']._parameters['weight']`)."""
    return source.split(stack.source_marker(position), 1)[1]


def _match_layers(first: list[fx.Node], second: list[fx.Node], params: dict[fx.Node, fx.Node],
                  layer_of: dict[fx.Node, int | None]) -> dict[fx.Node, fx.Node]:
    """Check that the two layers are the same ops on corresponding inputs; return, for each value the second
    layer reads from the first, the first layer's node that plays its role there (the layer's output feeding the
    next, in place of the value that fed the first layer).

    Corresponding inputs: each layer's own nodes pair up in order, layer parameters pair up by their source
    after the layer's marker, and anything else (embeddings, masks, rotary tables, sizes) must be the same node,
    except the values the second layer reads from the first, each of which must stand where the first layer read
    one value from before the layers, the same one every time."""
    if len(first) != len(second):
        raise StampRefused(f"the two layers trace to {len(first)} and {len(second)} ops")
    pair = dict(zip(first, second))
    fed_by: dict[fx.Node, fx.Node] = {}  # outside value the first layer read -> first-layer node the second read

    def same(a: object, b: object) -> bool:
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            if a in pair:
                return pair[a] is b
            if a in params:
                return params[a] is b
            if layer_of.get(b) == 0:  # the second layer reads the first's output where the first read an input
                return fed_by.setdefault(a, b) is b
            return a is b
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, slice) and isinstance(b, slice):
            return same(a.start, b.start) and same(a.stop, b.stop) and same(a.step, b.step)
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            return False
        return type(a) is type(b) and (a == b or (a != a and b != b))  # NaN constants compare as equal

    for a, b in zip(first, second):
        if a.op != b.op or a.target != b.target or not same(a.args, b.args) or not same(a.kwargs, b.kwargs):
            raise StampRefused(f"the two layers differ at {a.name} / {b.name} ({a.op} {a.target})")
    # In a stamped copy, a value the traced last layer read from layer 0 comes from the copy before it: from that
    # copy's twin of the layer-0 node.
    return {output: pair[output] for output in fed_by.values()}
