"""On a CPU graph, the fused ops' launchers → their PyTorch references, called directly (and the registered attention
op → its implementation, without the dispatcher).

On CPU tensors every launcher (`kernels.rms_norm`, ...) validates its arguments and then runs the op's `_ref`
anyway (Triton runs only on CUDA, or on the CPU inside `triton_on_cpu()`). In a captured graph the shapes and
dtypes are fixed at capture, so the checks prove nothing new on each call, and on a 2-core CPU they were ~10% of a
SmolLM2-135M decode step (the graph calls ~100 fused ops a step). A CUDA graph keeps its launchers.
"""

from __future__ import annotations

import torch

from fastllm import kernels
from fastllm.kernels.step_attention import step_attention_direct
from fastllm.passes._context import PassContext
from fastllm.passes._graph import fake

NAME = "reference_ops"
# Last among the passes that emit launchers: it must see every one of them.
RUNS_AFTER: tuple[str, ...] = ("rms_norm", "layer_norm", "rotary", "gated_mlp", "quantize", "skinny_linear",
                               "decode_act_fusion", "decode_fusion", "fp8_input_quant", "int4_act_fusion",
                               "linear_norm", "attention")
RUNS_BEFORE: tuple[str, ...] = ()
RUNTIME_REQUIRED = True

# launcher -> its reference (same positional and keyword arguments, same results).
REFERENCES = {
    kernels.rms_norm: kernels.rms_norm_ref,
    kernels.fused_add_rms_norm: kernels.fused_add_rms_norm_ref,
    kernels.layer_norm: kernels.layer_norm_ref,
    kernels.fused_add_layer_norm: kernels.fused_add_layer_norm_ref,
    kernels.rotary_embedding: kernels.rotary_embedding_ref,
    kernels.silu_and_mul: kernels.silu_and_mul_ref,
    kernels.gelu_and_mul: kernels.gelu_and_mul_ref,
    kernels.skinny_linear: kernels.skinny_linear_ref,
    kernels.fused_linear: kernels.fused_linear_ref,
    kernels.step_attention: step_attention_direct,  # the registered op's implementation, without the dispatcher
    kernels.fp8_linear: kernels.fp8_linear_ref,
    kernels.int8_linear: kernels.int8_linear_ref,
    kernels.int4_linear: kernels.int4_linear_ref,
    kernels.rms_norm_fp8_linear: kernels.rms_norm_fp8_linear_ref,
    kernels.act_and_mul_fp8_linear: kernels.act_and_mul_fp8_linear_ref,
    kernels.int4_linear_and_act: kernels.int4_linear_and_act_ref,
    kernels.linear_add_rms_norm: kernels.linear_add_rms_norm_ref,
}
LAUNCHER_OF = {ref: launcher for launcher, ref in REFERENCES.items()}


def pattern(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return kernels.rms_norm(x, weight, eps)


def replacement(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return kernels.rms_norm_ref(x, weight, eps)


def _graph_device(ctx: PassContext) -> torch.device | None:
    """The device of the graph's inputs (the real tensors behind its placeholders, else their recorded fakes)."""
    for node in ctx.gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = ctx.tensor(node)
        value = value if isinstance(value, torch.Tensor) else fake(node)
        if value is not None:
            return value.device
    return None


def apply(ctx: PassContext) -> int:
    device = _graph_device(ctx)
    if device is None or device.type != "cpu" or kernels.use_triton(torch.empty(0, device=device)):
        return 0
    count = 0
    for node in ctx.gm.graph.nodes:
        if node.op == "call_function" and node.target in REFERENCES:
            node.target = REFERENCES[node.target]
            count += 1
    return count
