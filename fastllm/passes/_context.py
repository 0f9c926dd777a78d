"""What a pass needs besides the graph: the real tensors behind placeholders, and merged weights."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx

from fastllm.passes._graph import arg, is_op

if TYPE_CHECKING:
    from fastllm.quant.checkpoints import Prequantized


@dataclass
class WeightMerger:
    """Concatenates weights once and keeps the parts as views into the merged tensor.

    Merging Q/K/V (or gate/up) weights into one tensor must not double the model's memory: the merged
    tensor is allocated one group at a time, and each original parameter is re-pointed (`param.data =`)
    at its slice of it, which frees the old storage. The model's own modules, state_dict and any unfused
    path keep working on the views. Dynamo recaptures (prefill, decode, new shapes) meet the same
    parameters again; the cache, keyed by the parts' addresses, hands back the same merged tensor.
    """

    merged: dict[tuple, torch.Tensor] = field(default_factory=dict)
    # (weight address, shape, scheme, group size) -> the weight's quantized tensors (passes/quantize.py)
    quantized: dict[tuple, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    # module name -> its rows of a quantized weight (quant/resident.py frees the float weights after compiling)
    quantized_rows: dict[str, object] = field(default_factory=dict)
    # Norms whose weight a pass folded into the linears reading them (passes/decode_fusion.py): those parameters were
    # changed in place (the model computes the same function up to one rounding of them), which release() says.
    folded_norms: int = 0

    @staticmethod
    def _key(parts: list[torch.Tensor]) -> tuple:
        return tuple((p.data_ptr(), tuple(p.shape), p.dtype) for p in parts)

    @torch.no_grad()
    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """One tensor holding `parts` concatenated along dim 0; the parts become views of it."""
        key = self._key(parts)
        if key in self.merged:
            return self.merged[key]
        merged = torch.cat([p.detach() for p in parts], dim=0)
        offset = 0
        for p in parts:
            p.data = merged[offset:offset + p.shape[0]]
            offset += p.shape[0]
        self.merged[self._key(parts)] = merged
        return merged


@dataclass
class PassContext:
    """Per-graph state handed to every pass."""

    gm: fx.GraphModule
    # placeholder node -> the real tensor dynamo passed for it (parameters and buffers among them)
    tensors: dict[fx.Node, torch.Tensor]
    merger: WeightMerger
    model_config: object | None = None  # the HF config, for per-layer data a call does not show
    step_context: int | None = None     # id of the StepContext the attention ops of this graph read
    quantization: object | None = None  # the model's QuantConfig (passes/quantize.py), or None
    # The model's parameters by name, tied ones under each name (to name the layers a weight belongs to).
    parameters: dict[str, torch.Tensor] = field(default_factory=dict)
    quantized_layers: dict[str, str] = field(default_factory=dict)  # layer -> scheme (or why it was not)
    # A pre-quantized checkpoint's layers (module name -> the scheme's tensors, and act-order input orders), used
    # instead of quantizing; None when the model's weights are quantized here.
    prequantized: Prequantized | None = None
    # The runtime's step graph: the placeholders of its inputs (token ids, positions, sampled rows), the positions'
    # own, and how many positions it can be fed (max_model_len): what rope_table needs. Unset for other graphs.
    step_inputs: frozenset[fx.Node] = frozenset()
    positions: fx.Node | None = None
    max_positions: int | None = None
    _num_constants: int = 0

    def linears(self) -> Iterator[tuple[fx.Node, torch.Tensor]]:
        """(node, weight) for each `linear` call whose weight is a known 2-D tensor, over a snapshot of the nodes (a
        pass may replace the node it is given)."""
        for node in list(self.gm.graph.nodes):
            if is_op(node, "linear"):
                weight = self.weight(arg(node, 1, "weight"))
                if weight is not None and weight.dim() == 2:
                    yield node, weight

    def module_names(self, weight: torch.Tensor) -> list[str]:
        """The modules whose weight parameter lives in `weight`'s storage: one for a plain linear, the parts of a
        merged QKV / gate-up weight (their parameters are views of it), both names of a tied weight."""
        storage = weight.untyped_storage().data_ptr()
        return [name.removesuffix(".weight") for name, p in self.parameters.items()
                if name.endswith(".weight") and p.dim() == 2 and p.untyped_storage().data_ptr() == storage]

    def tensor(self, node: object) -> torch.Tensor | None:
        return self.tensors.get(node) if isinstance(node, fx.Node) else None

    def weight(self, node: object) -> torch.Tensor | None:
        """The tensor behind a weight argument: a parameter placeholder, or a constant an earlier pass registered
        (a merged QKV / gate-up weight)."""
        if isinstance(node, fx.Node) and node.op == "get_attr":
            return getattr(self.gm, node.target, None)
        return self.tensor(node)

    def constant(self, value: torch.Tensor, before: fx.Node) -> fx.Node:
        """A get_attr node, inserted before `before`, that reads `value` from the GraphModule."""
        name = f"_fastllm_const_{self._num_constants}"
        self._num_constants += 1
        self.gm.register_buffer(name, value, persistent=False)
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.get_attr(name)
