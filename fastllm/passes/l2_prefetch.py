"""Each decode linear's weight starts moving into L2 right after the linear before it (`kernels.prefetch_l2`):

    q = skinny_linear(h, W_qkv)                      q = skinny_linear(h, W_qkv)
    ... rotary, KV write, attention ...      →       prefetch_l2(W_o, q)
    o = skinny_linear(a, W_o)                        ... rotary, KV write, attention ...
                                                     o = skinny_linear(a, W_o)

In a batch-1 decode step the small kernels between two GEMVs leave the memory bus nearly idle; the prefetch fills
that time with the next weight's first bytes (up to PREFETCH_MAX_BYTES), which the GEMV then reads from L2. Results
are unchanged: the prefetch reads and writes no tensor. It launches only for steps of up to PDL_MAX_ROWS rows, on
sm_90+ GPUs (kernels/l2_prefetch.py). Opt-in until measured (benchmarks/run_on_gpu.sh stage l2prefetch).
"""

from __future__ import annotations

import torch
from torch import fx

from fastllm import kernels
from fastllm.passes._context import PassContext

NAME = "l2_prefetch"
# After every pass that makes, merges or replaces the linears it reads.
RUNS_AFTER: tuple[str, ...] = ("gated_mlp", "qkv", "quantize", "skinny_linear", "decode_act_fusion", "decode_fusion",
                               "fp8_input_quant", "int4_act_fusion")
RUNS_BEFORE: tuple[str, ...] = ()
RUNTIME_REQUIRED = False
DEFAULT = False

# The decode linears' launchers and the position of their (first) weight argument: what the step reads most.
WEIGHT_ARG = {
    kernels.skinny_linear: 1,
    kernels.fused_linear: 1,
    kernels.fp8_linear: 1,
    kernels.int8_linear: 1,
    kernels.int4_linear: 1,
    kernels.int4_linear_and_act: 1,
    kernels.act_and_mul_fp8_linear: 1,
    kernels.rms_norm_fp8_linear: 3,
}


def pattern(x: torch.Tensor, w1: torch.Tensor, y: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return kernels.skinny_linear(x, w1), kernels.skinny_linear(y, w2)


def replacement(x: torch.Tensor, w1: torch.Tensor, y: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    first = kernels.skinny_linear(x, w1)
    kernels.prefetch_l2(w2, first)
    return first, kernels.skinny_linear(y, w2)


def _weight(node: fx.Node) -> fx.Node | None:
    index = WEIGHT_ARG[node.target]
    weight = node.args[index] if len(node.args) > index else None
    return weight if isinstance(weight, fx.Node) and weight.op in ("placeholder", "get_attr") else None


def apply(ctx: PassContext) -> int:
    graph = ctx.gm.graph
    position = {node: i for i, node in enumerate(graph.nodes)}
    linears = [n for n in graph.nodes if n.op == "call_function" and n.target in WEIGHT_ARG and _weight(n)]
    count = 0
    for before, linear in zip(linears, linears[1:], strict=False):
        weight = _weight(linear)
        tensor = ctx.weight(weight)
        if tensor is None or not tensor.is_contiguous():
            continue
        if position[weight] > position[before]:
            before.prepend(weight)  # a merged weight's get_attr (made just before its linear): it reads no node
        with graph.inserting_after(before):
            graph.call_function(kernels.prefetch_l2, (weight, before.args[0]))  # like: the step's rows
        count += 1
    return count
