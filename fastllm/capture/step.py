"""The compile step: a model's forward on the runtime's ragged batch, captured once, fused, and profiled.

    compiled = compile_step(model, passes=resolve_passes(config.passes))
    logits = compiled(input_ids, position_ids, logits_indices)   # inside compiled.context.step(metadata, kv_caches)

The runtime calls the model as HF would on a flattened ragged batch (`input_ids [1, T]`, `position_ids [1, T]`, no
HF cache) with `logits_to_keep` = the rows to sample. Everything but attention is token-wise, so one graph serves
prefill, decode and mixed steps, and `model(...)` too. Dynamo captures it with symbolic sizes (one trace for every
step shape), the passes rewrite it (the attention pass puts `fastllm::step_attention` in place of the model's
attention, reading this step's `StepContext`), and a first profiling forward records each layer's KV shape, which
the runtime sizes its cache from. This is the only capture of a model: the runtime and every entry point run this
step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx

from fastllm.capture import graph_cache
from fastllm.capture.dynamo import capture
from fastllm.capture.layer_stamp import LayerStamp, find_layer_stack
from fastllm.kernels.compile_ahead import launches_for_real, prepare_triton, run_compiling_ahead
from fastllm.kernels.step_attention import StepContext
from fastllm.models.experts import graph_safe_experts
from fastllm.passes import op_histogram, run_passes
from fastllm.passes._context import WeightMerger

if TYPE_CHECKING:
    from fastllm.quant.checkpoints import Prequantized

# Tokens of the profiling forward: long enough to be a prefill (not a size dynamo specializes), short enough to
# cost nothing.
PROFILE_TOKENS = 256
# FASTLLM_LAYER_STAMP=0 traces every layer (capture/layer_stamp.py): for A/B measurement of start-up, and a way out
# should a model be stamped wrongly.
STAMP_LAYERS = os.environ.get("FASTLLM_LAYER_STAMP", "1") != "0"


class UnpageableModel(NotImplementedError):
    """The model's attention could not be replaced by paged attention: the runtime cannot run it."""


@dataclass
class GraphReport:
    """What the passes did to the captured graph."""

    matches: dict[str, int]          # pass name -> subgraphs it replaced
    fused_ops: dict[str, int]        # fastllm kernel -> calls in the rewritten graph
    unfused_ops: dict[str, int]      # other compute ops left as they were captured
    num_nodes_before: int
    num_nodes_after: int
    quantized_layers: dict[str, str] = field(default_factory=dict)  # layer -> scheme (quantization=...)


@dataclass
class CompiledStep:
    """A model's fused forward on the ragged batch.

    Call it as `compiled(input_ids [1, T], position_ids [1, T], logits_indices [R]) -> logits [1, R, V]` inside
    `compiled.context.step(metadata, kv_caches)`. `kv_shapes[i]` is layer i's (num_kv_heads, head_dim).
    """

    fn: Callable
    context: StepContext
    kv_shapes: list[tuple[int, int]]
    report: GraphReport
    from_graph_cache: bool
    seconds: float                                   # capture, passes and the profiling forward
    layers_stamped: bool = False                     # traced with two layers, the others stamped out
    merger: WeightMerger = field(default_factory=WeightMerger)

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 logits_indices: torch.Tensor) -> torch.Tensor:
        return self.fn(input_ids, position_ids, logits_indices)


def compile_step(model: torch.nn.Module, passes: tuple[str, ...], *, hf_forward: Callable | None = None,
                 use_graph_cache: bool = True, quantization: object | None = None,
                 prequantized: Prequantized | None = None, max_positions: int | None = None) -> CompiledStep:
    """Capture `model`'s forward on the ragged batch, run `passes` (in this order) on it, and profile it once.

    Args:
        model: an HF causal LM (its parameters on the device the runtime will use).
        passes: the pass names to run, in order (see `fastllm.passes`); must include "attention".
        hf_forward: the model's own forward (default `model.forward`).
        use_graph_cache: keep the captured graph on disk and reuse it in later processes (capture/graph_cache.py).
        quantization: a QuantConfig: the quantize pass swaps the linears (the graph cache holds the graph before the
            passes, so one cached graph serves every scheme).
        prequantized: a pre-quantized checkpoint's layers (quant/checkpoints.py), used as they are.
        max_positions: the most positions the runtime will feed (its max_model_len): the rope_table pass's table
            covers positions 0 .. max_positions - 1 (None: no table).

    Raises:
        CAPTURE_ERRORS (dynamo's): the model cannot be captured as one graph.
        UnpageableModel: its attention is not something the attention pass recognises.
    """
    start = time.perf_counter()
    experts = graph_safe_experts(model)
    if experts is not None:  # MoE: an implementation whose trace a CUDA graph can replay (models/experts.py)
        model.set_experts_implementation(experts)
    hf_forward = hf_forward or model.forward
    context = StepContext()
    merger = WeightMerger()
    reports: list[GraphReport] = []

    device = next(model.parameters()).device
    prepare_triton(device)  # Triton's once-a-process set-up, on a thread while dynamo traces
    inputs = _profile_inputs(device, max_positions)

    def transform(gm: fx.GraphModule, tensors: dict) -> fx.GraphModule:
        before = len(gm.graph.nodes)
        quantized: dict[str, str] = {}
        with launches_for_real():  # the passes' work on weights outlives the (perhaps dry) first forward
            matches = run_passes(gm, tensors, merger, passes, model.config, step_context=context.id,
                                 quantization=quantization, quantized_layers=quantized, prequantized=prequantized,
                                 parameters=dict(model.named_parameters(remove_duplicate=False)),
                                 step_inputs=_input_placeholders(tensors, inputs), max_positions=max_positions)
        fused, unfused = op_histogram(gm)
        reports.append(GraphReport(matches, dict(fused), dict(unfused), before, len(gm.graph.nodes), quantized))
        return gm

    def step(input_ids, position_ids, logits_indices):
        out = hf_forward(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                         logits_to_keep=logits_indices)
        return out.logits

    key = graph_cache.cache_key(step, model, hf_forward) if use_graph_cache else None
    stack = find_layer_stack(model)[0] if STAMP_LAYERS else None
    layers = LayerStamp(model, stack) if stack is not None else None
    fn = capture(step, transform, dynamic=True, cache_key=key, direct=True, layers=layers)
    kv_shapes = _profile(fn, context, inputs)
    if not kv_shapes:
        raise UnpageableModel(f"{type(model).__name__}'s attention could not be paged: neither an SDPA call nor "
                              "hand-written attention that fastllm recognises (or a score bias that is neither a mask "
                              "nor ALiBi declared by the config)")
    return CompiledStep(fn, context, kv_shapes, reports[-1], getattr(fn, "from_graph_cache", False),
                        time.perf_counter() - start, layers_stamped=layers is not None and layers.stamped,
                        merger=merger)


def _profile_inputs(device: torch.device,
                    max_positions: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The profiling forward's (input_ids, position_ids, logits_indices): the call that captures the graph. Its
    positions stay below max_positions (a model of fewer positions than PROFILE_TOKENS: learned position
    embeddings and rope_table's tables end there)."""
    ids = torch.zeros(1, PROFILE_TOKENS, dtype=torch.long, device=device)
    # Inputs laid out as every later step's (plain tensors, not views): dynamo guards on view bases too.
    positions = (torch.arange(PROFILE_TOKENS, device=device) % (max_positions or PROFILE_TOKENS)).unsqueeze(0).clone()
    # Two sampled rows, not one: dynamo specializes sizes of 1, and decode steps sample several rows.
    rows = torch.tensor([PROFILE_TOKENS - 2, PROFILE_TOKENS - 1], device=device)
    return ids, positions, rows


def _input_placeholders(tensors: dict[fx.Node, torch.Tensor],
                        inputs: tuple[torch.Tensor, ...]) -> tuple[fx.Node | None, ...]:
    """The placeholders the capturing call's inputs arrived in (by storage: dynamo hands the backend the call's
    tensors), None for one not found."""
    def find(value: torch.Tensor) -> fx.Node | None:
        return next((n for n, t in tensors.items() if t.data_ptr() == value.data_ptr() and t.shape == value.shape
                     and t.dtype == value.dtype), None)

    return tuple(find(value) for value in inputs)


@torch.no_grad()
def _profile(fn: Callable, context: StepContext,
             inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[tuple[int, int]]:
    """A plain causal forward: captures the graph (first call) and records each layer's (num_kv_heads, head_dim)."""
    ids, positions, rows = inputs
    shapes: dict[int, tuple[int, int]] = {}
    with context.step(None, None, shapes):
        # The first call traces and fuses; its kernels then compile side by side (kernels/compile_ahead.py).
        run_compiling_ahead(fn, ids, positions, rows, device=ids.device)
    if len(set(shapes.values())) > 1:
        raise UnpageableModel("layers with different KV shapes are not supported yet")
    return [shapes[i] for i in sorted(shapes)]
