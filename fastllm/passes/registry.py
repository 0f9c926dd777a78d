"""Every fusion pass, the order they run in, and how a selection of passes becomes the list to run.

Each pass module declares, beside its `NAME`:

    RUNS_AFTER:       passes that must run before this one when both run (it needs what they leave behind)
    RUNS_BEFORE:      passes that must run after this one when both run (it must see the graph before they do)
    RUNTIME_REQUIRED: True for a pass the runtime always runs on its own graph; such a pass is not
                      user-selectable, and `optimize()`'s drop-in graph never runs it
    DEFAULT:          optional; False for an opt-in pass, which runs only when selected (see DEFAULT_PASSES)

The canonical order is a topological sort of those constraints, stable in the order the modules are listed
in `REGISTRY`: the constraints decide wherever they apply, the listing breaks the remaining ties. A selection
always runs in the canonical order, whatever order it was given in. A cycle in the declarations, a duplicate
name or a declaration naming no registered pass is refused when the registry is built (at import).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from types import ModuleType

from fastllm.passes import (
    attention,
    decode_act_fusion,
    decode_fusion,
    dropout,
    fp8_input_quant,
    gated_mlp,
    int4_act_fusion,
    layer_norm,
    linear_norm,
    list_index,
    qkv,
    quantize,
    reference_ops,
    rms_norm,
    rope_table,
    rotary,
    skinny_linear,
)


class PassRegistry:
    """Pass modules by name, with their canonical order (see the module docstring)."""

    def __init__(self, modules: Iterable[ModuleType]):
        self._modules: dict[str, ModuleType] = {}
        for module in modules:
            name = getattr(module, "NAME", None)
            if not isinstance(name, str) or not name:
                raise ValueError(f"pass module {getattr(module, '__name__', module)!r} declares no NAME")
            if name in self._modules:
                raise ValueError(f"two pass modules declare NAME {name!r}")
            self._modules[name] = module
        self.order: tuple[str, ...] = _stable_topological_sort(list(self._modules), self._successors())
        self._rank = {name: i for i, name in enumerate(self.order)}
        self.runtime_required = tuple(n for n in self.order if getattr(self._modules[n], "RUNTIME_REQUIRED", False))
        self.selectable = tuple(n for n in self.order if n not in self.runtime_required)
        # What optimize() runs unless told: every selectable pass but those declaring DEFAULT = False (opt-in)
        self.default = tuple(n for n in self.selectable if getattr(self._modules[n], "DEFAULT", True))

    def module(self, name: str) -> ModuleType:
        return self._modules[name]

    def ordered(self, names: Iterable[str]) -> tuple[str, ...]:
        """`names` (any registered passes, runtime-required ones included) in canonical order, without repeats."""
        names = _as_names(names, self.order)
        _refuse_unknown(names, self.order)
        return tuple(sorted(set(names), key=self._rank.__getitem__))

    def select(self, names: Iterable[str]) -> tuple[str, ...]:
        """A user's selection (only user-selectable passes) in canonical order, without repeats."""
        names = _as_names(names, self.selectable)
        runtime = [n for n in names if n in self.runtime_required]
        if runtime:
            raise ValueError(f"pass(es) {runtime} always run in the runtime's graph and cannot be selected; "
                             f"allowed: {', '.join(self.selectable)}")
        _refuse_unknown(names, self.selectable)
        return self.ordered(names)

    def resolve(self, selected: Iterable[str]) -> tuple[str, ...]:
        """Every pass to run on the runtime's graph: `selected` plus the runtime-required passes, in canonical order."""
        return self.ordered((*_as_names(selected, self.order), *self.runtime_required))

    def _successors(self) -> dict[str, list[str]]:
        """name -> the passes that must run after it, from every module's RUNS_AFTER and RUNS_BEFORE."""
        successors: dict[str, list[str]] = {name: [] for name in self._modules}
        for name, module in self._modules.items():
            for attr in ("RUNS_AFTER", "RUNS_BEFORE"):
                declared = getattr(module, attr, ())
                if isinstance(declared, str) or not isinstance(declared, (tuple, list)):
                    raise ValueError(f"pass {name!r}: {attr} must be a tuple of pass names, got {declared!r}")
                for other in declared:
                    if other not in self._modules:
                        raise ValueError(f"pass {name!r} declares {attr} {other!r}, which is no registered pass; "
                                         f"registered: {', '.join(self._modules)}")
                    first, then = (other, name) if attr == "RUNS_AFTER" else (name, other)
                    if then not in successors[first]:
                        successors[first].append(then)
        return successors


def _stable_topological_sort(names: list[str], successors: dict[str, list[str]]) -> tuple[str, ...]:
    """Kahn's algorithm taking, of the passes free to run next, the one listed first; refuses a cycle."""
    listed = {name: i for i, name in enumerate(names)}
    waiting_on = {name: 0 for name in names}
    for name in names:
        for then in successors[name]:
            waiting_on[then] += 1
    ready = [listed[n] for n in names if waiting_on[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        name = names[heapq.heappop(ready)]
        order.append(name)
        for then in successors[name]:
            waiting_on[then] -= 1
            if waiting_on[then] == 0:
                heapq.heappush(ready, listed[then])
    if len(order) < len(names):
        raise ValueError(f"the passes' RUNS_AFTER/RUNS_BEFORE declarations form a cycle: "
                         f"{' -> '.join(_find_cycle(successors, set(names) - set(order)))}")
    return tuple(order)


def _find_cycle(successors: dict[str, list[str]], stuck: set[str]) -> list[str]:
    """One cycle among the passes the sort could not place, as [a, b, ..., a]: a runs before b, ..., before a.

    Every stuck pass waits on another stuck pass, so walking back along 'waits on' from any of them must
    come round to a pass already visited.
    """
    predecessors = {n: [p for p in successors if n in successors[p] and p in stuck] for n in stuck}
    path, seen = [], {}
    node = min(stuck)
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = predecessors[node][0]
    cycle = path[seen[node]:][::-1]  # walked against the edges: reverse into run order
    start = cycle.index(min(cycle))  # the same cycle always reads the same way
    cycle = cycle[start:] + cycle[:start]
    return cycle + [cycle[0]]


def _as_names(names: Iterable[str], allowed: tuple[str, ...]) -> list[str]:
    if isinstance(names, str):  # a single name would otherwise be read as its letters
        raise ValueError(f"passes must be a sequence of pass names, got the string {names!r}; "
                         f"allowed names: {', '.join(allowed)}")
    return list(names)


def _refuse_unknown(names: list[str], allowed: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown pass name(s) {unknown}; allowed: {', '.join(allowed)}")


# The listing breaks ties only; it is the order these passes ran in before the constraints were declared.
REGISTRY = PassRegistry((dropout, list_index, rms_norm, layer_norm, rotary, gated_mlp, qkv, attention,
                         quantize, skinny_linear, decode_act_fusion, decode_fusion, fp8_input_quant,
                         int4_act_fusion, linear_norm, rope_table, reference_ops))

# The user-selectable passes in canonical order (public as fastllm.ALL_PASSES).
ALL_PASSES: tuple[str, ...] = REGISTRY.selectable
# The ones optimize() runs by default (public as fastllm.DEFAULT_PASSES): all of them but the opt-in ones.
DEFAULT_PASSES: tuple[str, ...] = REGISTRY.default
# Run on the runtime's graph whatever the selection: list indices made device constants (CUDA-graph capture refuses
# host copies), paged attention (the runtime depends on it), quantized linears (a no-op unless the model is quantized),
# the skinny GEMM (pays off where decode steps replay from CUDA graphs), and on CPU graphs the references called
# without their launchers.
RUNTIME_REQUIRED: tuple[str, ...] = REGISTRY.runtime_required


def select_passes(names: Iterable[str]) -> tuple[str, ...]:
    """A user's selection (`OptimizeConfig.passes`) validated and in canonical order.

    Raises ValueError for a string, an unknown name, or a runtime-required pass.
    """
    return REGISTRY.select(names)


def resolve_passes(selected: Iterable[str]) -> tuple[str, ...]:
    """The passes to run on the runtime's graph, in order: `selected` plus `RUNTIME_REQUIRED`.

    `resolve_passes(("qkv", "gated_mlp")) == ("gated_mlp", "qkv", "attention", "skinny_linear")`.
    Raises ValueError for an unknown name. Idempotent: its result resolves to itself.
    """
    return REGISTRY.resolve(selected)


def order_passes(names: Iterable[str]) -> tuple[str, ...]:
    """Registered passes `names`, nothing added, in canonical order (what `run_passes` runs)."""
    return REGISTRY.ordered(names)
