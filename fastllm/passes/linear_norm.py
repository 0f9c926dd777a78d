"""A decode linear followed by the residual add and RMSNorm → `kernels.linear_add_rms_norm` (one launch).

After rms_norm, skinny_linear, quantize and decode_act_fusion, a Llama layer's decode step reads

    normed, summed = fused_add_rms_norm(residual, skinny_linear(attn, W_o))           # o_proj, then the norm
    normed, summed = fused_add_rms_norm(residual, fused_linear(gate_up, W_down, prologue="silu"))

and becomes

    normed, summed = linear_add_rms_norm(attn, W_o, None, residual, norm_weight, eps, counter=c)
    normed, summed = linear_add_rms_norm(gate_up, W_down, None, residual, ..., prologue="silu", counter=c)

where the skinny GEMM's last program adds the residual and normalises (kernels/linear_add_norm.py): two kernels and
two kernel boundaries a layer fewer in the decode CUDA graph, but slower where measured (DEFAULT says by how much:
opt-in). FP8 and int8 linears with a scale per output channel (`quantization="fp8" | "int8"`) fuse as float ones
do. Matched only where the linear's output is read by the norm alone. One int32 counter, a buffer of the graph
module, serves every call (the step's kernels run in order on one stream).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from fastllm import kernels
from fastllm.kernels.linear_add_norm import PROLOGUES
from fastllm.passes._context import PassContext
from fastllm.passes._graph import fake

NAME = "linear_norm"
RUNS_AFTER: tuple[str, ...] = ("rms_norm", "skinny_linear", "quantize", "decode_act_fusion", "decode_fusion",
                               "fp8_input_quant")  # those take the norms they fuse first
RUNS_BEFORE: tuple[str, ...] = ()  # reference_ops declares it runs after this one
RUNTIME_REQUIRED = False
# Opt-in (passes=(*fastllm.DEFAULT_PASSES, "linear_norm")): measured slower. H200, 2026-12-01, W1's batch-1 decode
# graph after a 256-token prompt (replay_ab.py, three alternating rounds, W1-replay-ab-...-linear-norm*.json): the
# last program holding the row whole, 3838.9 us against 3780.0 without the pass (Llama-2-7B), 4196.9 against 4140.5
# (Llama-3.1-8B): +1.4-1.6%; in 1024-column chunks (two passes, S read back) +5.5-6%. The norm kernel it replaces
# costs ~2 us; what the last program adds is more: each of ~1000 programs' acquire-release arrival on one counter,
# then one program's serial row (its loads wait for the arrival), and the row held whole raises the GEMV's registers
# from 72 to 128 (fewer programs an SM). The decode attention's merge gains where few programs (a head's splits)
# meet; here every program of the GEMV does. A next attempt needs the norm without a single meeting point (a
# per-block partial sum of squares, finished by the next GEMV's programs as they read x).
DEFAULT = False


def pattern(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.fused_add_rms_norm(residual, kernels.skinny_linear(x, w), norm_weight, eps)


def replacement(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                eps: float, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.linear_add_rms_norm(x, w, None, residual, norm_weight, eps, counter=counter)


def _linear(node: object) -> dict | None:
    """A decode linear's arguments as linear_add_rms_norm's (x, weight, bias and keywords), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is kernels.skinny_linear and len(node.args) <= 3 and not node.kwargs:
        x, weight, bias = (*node.args, None, None)[:3]
        return {"x": x, "weight": weight, "bias": bias}
    if node.target is kernels.fused_linear and len(node.args) <= 3 and set(node.kwargs) == {"prologue"} \
            and node.kwargs["prologue"] in PROLOGUES:
        x, weight, bias = (*node.args, None, None)[:3]
        return {"x": x, "weight": weight, "bias": bias, "prologue": node.kwargs["prologue"]}
    if node.target in (kernels.fp8_linear, kernels.int8_linear) and len(node.args) in (3, 4) and not node.kwargs:
        x, weight, weight_scale, bias = (*node.args, None)[:4]
        scale = fake(weight_scale)
        if scale is None or scale.dim() != 1:  # block scales: the skinny GEMM reads them unfused only
            return None
        return {"x": x, "weight": weight, "bias": bias, "weight_scale": weight_scale}
    return None


def _getitems_only(node: fx.Node) -> bool:
    return all(u.op == "call_function" and u.target is operator.getitem for u in node.users)


def apply(ctx: PassContext) -> int:
    graph = ctx.gm.graph
    counter = None
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not kernels.fused_add_rms_norm or len(node.args) != 4 \
                or not _getitems_only(node):
            continue
        a, b = node.args[0], node.args[1]
        producer, residual = (b, a) if _linear(b) is not None and list(b.users) == [node] else (a, b)
        spec = _linear(producer)
        if spec is None or list(producer.users) != [node] or producer is residual:
            continue
        fy, fr = fake(producer), fake(residual)
        if fy is None or fr is None or fy.shape != fr.shape or fy.dtype != fr.dtype:
            continue
        weight = ctx.weight(spec["weight"])
        if weight is None or weight.device.type == "meta":
            continue  # the counter goes where the weights are (a traced graph's fakes may be on "meta")
        if counter is None:
            counter = ctx.constant(torch.zeros(1, dtype=torch.int32, device=weight.device), before=node)
        norm_weight, eps = node.args[2], node.args[3]
        kwargs = {"counter": counter, **{k: v for k, v in spec.items() if k not in ("x", "weight", "bias")},
                  **node.kwargs}
        with graph.inserting_before(node):
            fused = graph.call_function(kernels.linear_add_rms_norm,
                                        (spec["x"], spec["weight"], spec["bias"], residual, norm_weight, eps), kwargs)
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(producer)
        count += 1
    return count
