"""An int4 gate-up projection read only by its gated activation → `kernels.int4_linear_and_act`: at one or two rows
(batch-1 / batch-2 decode) the int4 decode kernel stores act(gate) * up itself, one launch and one [M, 2I] round trip
fewer a layer; past that, and on the CPU, the two launchers (or references) run as before. The same bits either way
(kernels/int4_gated_linear.py).

    gate_up = int4_linear(h, packed, scales, bias, zeros, split_counters=c)    → y = int4_linear_and_act(h, packed,
    y = silu_and_mul(gate_up)                                                      scales, bias, zeros,
                                                                                   activation="silu", split_counters=c)

Opt-in (passes=(*fastllm.DEFAULT_PASSES, "int4_act_fusion")): measured slower. On an H200 (2026-11-30, one call,
benchmarks/run_on_gpu.sh stage int4act, after its 17 GPU tests passed) W1-int4 of Llama-3.1-8B ran 355.3 tok/s with
it against 380.4 without (W1-int4-nvidia-h200-20261130-int4-act-fusion.json): ~0.18 ms a step, ~5.6 us a layer more,
although one launch fewer. Not the kernel by itself: in a one-row microbenchmark (CUDA graphs, 2026-12-01,
bench_quant_gemv --int4-gated: W5-quant-gemv-nvidia-h200-20261201-int4-splits-gated.json) the gated call took 28.7 us
against 29.0 for the linear then silu_and_mul (the linear alone 28.0), and it compiles to fewer registers (72 a
thread against 80). The loss comes with programmatic dependent launch: with PDL off for every launch (FASTLLM_PDL=0,
one call) the fusion measured 365.4 tok/s against 361.7 without it (W1-int4-nvidia-h200-20261201-int4-act-fusion-no-
pdl.json), where with PDL the unfused pair is fastest (380.4). The down projection's programs, launched early
straight after the gate-up GEMV rather than after the small activation kernel, are the suspect: so the int4 down
projection that reads the fused call's output is launched without PDL (`int4_linear(..., pdl=False)`), as the bf16
GEMV with the SiLU prologue is. Measured so (one call, 17 GPU tests passed first): 376.6 tok/s against 380.9 without
the pass (W1-int4-nvidia-h200-20261201-int4-act-fusion-down-no-pdl.json): most of the loss gone, still no gain.
"""

from __future__ import annotations

import torch
from torch import fx

from fastllm import kernels
from fastllm.passes._context import PassContext
from fastllm.passes.decode_fusion import ACTIVATION_OF

NAME = "int4_act_fusion"
# After the int4 linears and the activations exist, and after the decode fusions (which leave int4 linears alone).
RUNS_AFTER: tuple[str, ...] = ("gated_mlp", "quantize", "decode_act_fusion", "decode_fusion")
RUNS_BEFORE: tuple[str, ...] = ()  # reference_ops declares it runs after this one
RUNTIME_REQUIRED = False
DEFAULT = False


def pattern(gate_up: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return kernels.silu_and_mul(kernels.int4_linear(gate_up, packed, scales))


def replacement(gate_up: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return kernels.int4_linear_and_act(gate_up, packed, scales, activation="silu")


def _fuse(graph: fx.Graph, act: fx.Node) -> bool:
    """`act` (a gated activation of one argument) of an int4_linear that nothing else reads → one call."""
    if len(act.args) != 1 or set(act.kwargs) - {"approximate"}:
        return False
    linear = act.args[0]
    if not isinstance(linear, fx.Node) or linear.op != "call_function" or linear.target is not kernels.int4_linear:
        return False
    if len(linear.users) != 1 or set(linear.kwargs) - {"split_counters"} or not 3 <= len(linear.args) <= 5:
        return False
    with graph.inserting_before(act):
        fused = graph.call_function(kernels.int4_linear_and_act, linear.args,
                                    {**linear.kwargs, "activation": ACTIVATION_OF[act.target](act)})  # fmt: skip
    fused.meta.update(act.meta)
    act.replace_all_uses_with(fused)
    graph.erase_node(act)
    graph.erase_node(linear)
    for user in list(fused.users):  # the down projection: launched after the fused kernel ends (see the docstring)
        if user.target is kernels.int4_linear and user.args[:1] == (fused,):
            user.kwargs = {**user.kwargs, "pdl": False}
    return True


def apply(ctx: PassContext) -> int:
    count = 0
    for node in list(ctx.gm.graph.nodes):
        if node.op == "call_function" and node.target in ACTIVATION_OF:
            count += _fuse(ctx.gm.graph, node)
    return count
