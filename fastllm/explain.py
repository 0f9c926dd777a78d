"""`fastllm.explain(model)`: what optimize() fused and what still runs unfused."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GraphReport:
    """One captured graph (dynamo captures one per distinct call signature: prefill, decode, ...)."""

    matches: dict[str, int]          # pass name -> subgraphs it replaced
    fused_ops: dict[str, int]        # fastllm kernel -> calls in the rewritten graph
    unfused_ops: dict[str, int]      # other compute ops left as they were captured
    num_nodes_before: int
    num_nodes_after: int


@dataclass
class Report:
    model: str
    status: str                      # "optimized", "fallback" or "not captured yet"
    fallback_reason: str | None = None
    graphs: list[GraphReport] = field(default_factory=list)
    # The paged runtime's start-up: seconds per phase (capture, kv_cache, cuda_graphs) and graph_from_cache.
    startup: dict = field(default_factory=dict)

    @property
    def matches(self) -> dict[str, int]:
        """Per pass, the subgraphs replaced in the most recently captured graph."""
        return dict(self.graphs[-1].matches) if self.graphs else {}

    @property
    def unfused_ops(self) -> dict[str, int]:
        return dict(self.graphs[-1].unfused_ops) if self.graphs else {}

    def to_dict(self) -> dict:
        return asdict(self) | {"matches": self.matches, "unfused_ops": self.unfused_ops}

    def __str__(self) -> str:
        lines = [f"fastllm report for {self.model}: {self.status}"]
        if self.fallback_reason:
            lines.append(f"  running unoptimized because: {self.fallback_reason}")
        if not self.graphs:
            return "\n".join(lines)
        last = self.graphs[-1]
        lines.append(f"  graphs captured: {len(self.graphs)} (the latest is shown; "
                     f"{last.num_nodes_before} nodes before, {last.num_nodes_after} after)")
        lines.append("")
        width = max([4, *map(len, last.matches)])
        lines.append(f"  {'pass':<{width}} {'matches':>7}")
        lines += [f"  {name:<{width}} {count:>7}" for name, count in last.matches.items()]
        lines.append("")
        lines.append("  fused kernels:   " + _counts(last.fused_ops))
        lines.append("  still unfused:   " + _counts(last.unfused_ops))
        if self.startup:
            source = "loaded from the graph cache" if self.startup.get("graph_from_cache") else "traced"
            phases = ", ".join(f"{name.replace('_', ' ')} {seconds:.1f} s" for name, seconds in self.startup.items()
                               if isinstance(seconds, float))
            lines.append(f"  runtime start-up (graph {source}): {phases}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Report(model={self.model!r}, status={self.status!r}, matches={self.matches})"


def _counts(counts: dict[str, int]) -> str:
    if not counts:
        return "(none)"
    return ", ".join(f"{name} ×{n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def explain(model) -> Report:
    """The fusion report of a model returned by `fastllm.optimize()`.

    Raises:
        ValueError: the model was not optimized by fastllm.
    """
    state = getattr(model, "_fastllm_state", None)
    if state is None:
        raise ValueError(f"{type(model).__name__} was not optimized by fastllm; call fastllm.optimize(model) first")
    return state.report()
