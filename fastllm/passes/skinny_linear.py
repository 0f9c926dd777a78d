"""Linear → fastllm's skinny GEMM, which takes small batches (M ≤ 16 rows) and hands larger ones to cuBLAS.

At batch-1 decode a linear is a GEMV: reading the weight once is the whole cost, and the Triton split-N/split-K
kernel reads it closer to the copy bandwidth than cuBLAS does (benchmarks/bench_gemv.py). The choice between
the two is made per call from the input's row count, so prefill keeps cuBLAS. Only the runtime's graph runs
this pass: there each decode bucket is a CUDA graph, so the choice is made once, at capture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllm import kernels
from fastllm.passes._context import PassContext
from fastllm.passes._graph import arg, fake

NAME = "skinny_linear"
# After every pass that merges or replaces linears: they match `linear` calls, which this pass turns into
# skinny_linear calls, and this pass must see the merged GEMMs they leave.
RUNS_AFTER: tuple[str, ...] = ("gated_mlp", "qkv")
RUNS_BEFORE: tuple[str, ...] = ()
# Always run on the runtime's graph (never on optimize()'s drop-in one), where decode steps are CUDA graphs.
RUNTIME_REQUIRED = True


def pattern(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def replacement(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return kernels.skinny_linear(x, weight)


def apply(ctx: PassContext) -> int:
    graph = ctx.gm.graph
    count = 0
    for node, weight in ctx.linears():
        x = fake(node.args[0])
        if not weight.is_contiguous() or x is None:
            continue
        if weight.dtype not in (torch.float16, torch.bfloat16) or x.dtype != weight.dtype:
            continue  # fp32 models keep cuBLAS: the kernel's gain is in 16-bit weights' bandwidth
        with graph.inserting_before(node):
            fused = graph.call_function(kernels.skinny_linear, (node.args[0], arg(node, 1, "weight"),
                                                                arg(node, 2, "bias")))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        count += 1
    return count
