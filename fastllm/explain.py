"""`fastllm.explain(model)`: what optimize() fused, what still runs unfused, and how the model's calls ran."""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field

from fastllm.capture.step import GraphReport

# Passes whose work shows up in other ops' counts rather than as an op of their own.
_WHERE_THEY_RUN = {
    "qkv": "q/k/v projections merged into one linear per layer",
    "gated_mlp": "gate/up merged into one linear, then silu_and_mul / gelu_and_mul",
    "rotary": "rotary_embedding, or inside step_attention (one kernel rotates q/k and writes the KV cache)",
    "dropout": "removed (inference)",
    "skinny_linear": "skinny_linear (small-batch GEMMs; larger batches take cuBLAS)",
    "decode_fusion": "fused_linear (RMSNorms, SiLU/GELU * up and residual adds inside the small-batch GEMMs)",
    "decode_act_fusion": "fused_linear (SiLU/GELU * up inside the small-batch down projections)",
    "linear_norm": "linear_add_rms_norm (residual add + RMSNorm by the last program of the linear before them)",
    "rope_table": "rotary cos/sin read from a table made at start-up (index_select), not computed every step",
    "quantize": "fp8_linear / int8_linear / int4_linear (quantization=...; each layer's scheme listed below)",
}


@dataclass
class Report:
    model: str
    status: str                      # "optimized", "fallback" or "not captured yet"
    fallback_reason: str | None = None
    graph: GraphReport | None = None  # the one captured graph (the compiled step)
    # The runtime's start-up: seconds per phase (capture, kv_cache, cuda_graphs), graph_from_cache and layers_stamped.
    startup: dict = field(default_factory=dict)
    # model(...) calls by route: "compiled" (the compiled step) and "eager" (Hugging Face's forward).
    forward_calls: dict[str, int] = field(default_factory=dict)
    eager_forward_reason: str | None = None
    # The engine core's KV cache (ModelRunner.kv_cache_info): tokens and bytes now, the cap, growths so far.
    kv_cache: dict = field(default_factory=dict)
    # Why model.generate() and model(...) run Hugging Face's path (on the CPU, by default), or None.
    hf_path_reason: str | None = None
    # Bytes of float weights let go once quantized layers were compiled (quant/resident.py).
    float_bytes_released: int = 0

    @property
    def matches(self) -> dict[str, int]:
        """Per pass, the subgraphs it replaced in the compiled step."""
        return dict(self.graph.matches) if self.graph else {}

    @property
    def unfused_ops(self) -> dict[str, int]:
        return dict(self.graph.unfused_ops) if self.graph else {}

    def to_dict(self) -> dict:
        return asdict(self) | {"matches": self.matches, "unfused_ops": self.unfused_ops}

    def __str__(self) -> str:
        lines = [f"fastllm report for {self.model}: {self.status}"]
        if self.fallback_reason:
            lines.append(f"  running unoptimized (Hugging Face's forward and generate) because: {self.fallback_reason}")
        if self.hf_path_reason:
            lines.append(f"  model.generate() and model(...) run Hugging Face's path: {self.hf_path_reason}")
        if self.graph is None:
            return "\n".join(lines)
        g = self.graph
        lines.append(f"  compiled step: one graph, {g.num_nodes_before} nodes before the passes, {g.num_nodes_after} "
                     "after; generate(), LLM and model(...) run it")
        lines.append("")
        width = max([4, *map(len, g.matches)])
        lines.append(f"  {'pass':<{width}} {'matches':>7}  runs as")
        lines += [f"  {name:<{width}} {count:>7}  {_WHERE_THEY_RUN.get(name, '')}".rstrip()
                  for name, count in g.matches.items()]
        lines.append("")
        if g.quantized_layers:
            # Layers left in the model's dtype count together (each says why below): their reasons, one key each,
            # made the summary as long as the list
            schemes = collections.Counter("not quantized" if v.startswith("not quantized") else v
                                          for v in g.quantized_layers.values())
            lines.append("  quantized layers: " + _counts(dict(schemes)))
            width = max(map(len, g.quantized_layers))
            lines += [f"    {layer:<{width}}  {scheme}" for layer, scheme in g.quantized_layers.items()]
            if self.float_bytes_released:
                lines.append(f"    their float weights let go: {self.float_bytes_released / 2**20:,.0f} MiB "
                             "(those modules run quantized in Hugging Face's forward too)")
        lines.append("  fused kernels:   " + _counts(g.fused_ops))
        lines.append("  still unfused:   " + _counts(g.unfused_ops))
        if self.forward_calls:
            calls = ", ".join(f"{route} {n}" for route, n in sorted(self.forward_calls.items()))
            reason = f" (latest eager call: {self.eager_forward_reason})" if self.eager_forward_reason else ""
            lines.append(f"  model(...) calls: {calls}{reason}")
        if self.kv_cache:
            kv = self.kv_cache
            # A fixed size (num_kv_tokens) or a cache an LLM reserved is at its cap: it cannot grow any more.
            growth = (f"grows on demand to {kv['max_tokens']:,} tokens ({kv['max_bytes'] / 2**20:,.0f} MiB)"
                      if kv["tokens"] < kv["max_tokens"] else "its largest size")
            lines.append(f"  KV cache ({kv.get('dtype', '')}): {kv['tokens']:,} tokens "
                         f"({kv['bytes'] / 2**20:,.0f} MiB) now, {growth}; grown {kv['growths']} time(s)")
            if kv.get("scales"):
                k_scales, v_scales = zip(*kv["scales"])
                lines.append(f"  KV cache scales per layer: k {min(k_scales):g}..{max(k_scales):g}, "
                             f"v {min(v_scales):g}..{max(v_scales):g}")
        if self.startup:
            source = ("loaded from the graph cache" if self.startup.get("graph_from_cache") else
                      "traced with two layers, the others stamped out" if self.startup.get("layers_stamped") else
                      "traced")
            phases = ", ".join(f"{name.replace('_', ' ')} {seconds:.1f} s" for name, seconds in self.startup.items()
                               if isinstance(seconds, float))
            lines.append(f"  start-up (graph {source}): {phases}")
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
    compiled = state.compiled
    startup = dict(state.startup_seconds)
    if compiled is not None:
        startup["graph_from_cache"] = compiled.from_graph_cache
        startup["layers_stamped"] = compiled.layers_stamped
    kv_cache = state.core.runner.kv_cache_info() if state.core is not None and not state.core.closed else {}
    return Report(state.model_name, state.status, state.fallback_reason, compiled.report if compiled else None,
                  startup, dict(state.forward_routes), state.eager_forward_reason, kv_cache, state.hf_path_reason(),
                  state.float_bytes_released)
