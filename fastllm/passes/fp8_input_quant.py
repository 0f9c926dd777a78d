"""The kernel that makes an FP8 linear's input quantizes it: an RMSNorm or a gated activation read only by one FP8
linear → `kernels.rms_norm_fp8_linear` / `act_and_mul_fp8_linear`. Past 16 rows (prefill, large decode batches) the
norm's or the activation's kernel writes the e4m3 codes and row scales the FP8 GEMM reads, where fp8_linear
quantized their 16-bit output in a kernel of its own.

    n = rms_norm(x, w, eps)                     → y = rms_norm_fp8_linear(x, w, eps, qW, s, b)
    y = fp8_linear(n, qW, s, b)

    n, r = fused_add_rms_norm(a, b, w, eps)     → y, r = rms_norm_fp8_linear(a, w, eps, qW, s, bias, residual=b)
    y = fp8_linear(n, qW, s, bias)

    h = silu_and_mul(gate_up)                   → y = act_and_mul_fp8_linear(gate_up, qW, s, b, activation="silu")
    y = fp8_linear(h, qW, s, b)                   (GELU likewise)

The results are the unfused kernels' bit for bit (kernels/fp8_input_linear.py); up to 16 rows the launchers run
them. Only per-channel FP8 weights (`quantization="fp8"`; a block-scaled checkpoint's linears stay as they are), and
only a producer with one consumer (merged QKV and gate-up projections are one linear each).

Opt-in (passes=(*fastllm.DEFAULT_PASSES, "fp8_input_quant")): GPU-tested, and measured on an H200 (2026-11-30) within
what one call can tell from no change: W2-fp8 (Llama-3.1-8B, 1000 x 128/128) 23,009 output tok/s with it against
22,731 without in one call (+1.2%; benchmarks/run_on_gpu.sh stage optin-w2, W2-fp8-nvidia-h200-20261130-fp8-input-
quant.json), W1-fp8 at batch 1 362.5 tok/s against 362.0 (W1-fp8-nvidia-h200-20261130-input-quant-batch1.json).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from fastllm import kernels
from fastllm.passes._context import PassContext
from fastllm.passes.decode_fusion import ACTIVATION_OF

NAME = "fp8_input_quant"
# After the norms, the activations and the FP8 linears exist, and after what the decode fusions took in.
RUNS_AFTER: tuple[str, ...] = ("rms_norm", "gated_mlp", "quantize", "decode_act_fusion", "decode_fusion")
RUNS_BEFORE: tuple[str, ...] = ()  # reference_ops declares it runs after this one
RUNTIME_REQUIRED = False
DEFAULT = False


def pattern(x: torch.Tensor, norm_weight: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
            eps: float) -> torch.Tensor:
    return kernels.fp8_linear(kernels.rms_norm(x, norm_weight, eps), qweight, weight_scale)


def replacement(x: torch.Tensor, norm_weight: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                eps: float) -> torch.Tensor:
    return kernels.rms_norm_fp8_linear(x, norm_weight, eps, qweight, weight_scale)


def _fp8_consumer(ctx: PassContext, normed: fx.Node) -> fx.Node | None:
    """The one fp8_linear reading `normed` as its input (and as nothing else), with per-channel scales; else None."""
    if len(normed.users) != 1:
        return None
    user = next(iter(normed.users))
    if user.op != "call_function" or user.target is not kernels.fp8_linear or user.kwargs:
        return None
    if len(user.args) not in (3, 4) or user.args[0] is not normed or normed in user.args[1:]:
        return None
    scale = ctx.weight(user.args[2])
    return user if scale is not None and scale.dim() == 1 else None


def _fuse_activation(ctx: PassContext, act: fx.Node) -> bool:
    linear = _fp8_consumer(ctx, act)
    if linear is None or len(act.args) != 1:
        return False
    qweight, scale, bias = (*linear.args[1:], None)[:3]
    with ctx.gm.graph.inserting_before(linear):
        fused = ctx.gm.graph.call_function(kernels.act_and_mul_fp8_linear, (act.args[0], qweight, scale, bias),
                                           {"activation": ACTIVATION_OF[act.target](act)})  # fmt: skip
    fused.meta.update(linear.meta)
    linear.replace_all_uses_with(fused)
    ctx.gm.graph.erase_node(linear)
    ctx.gm.graph.erase_node(act)
    return True


def _fused_call(graph: fx.Graph, norm: fx.Node, linear: fx.Node, x, weight, eps, residual) -> fx.Node:
    """rms_norm_fp8_linear of the norm's and the linear's arguments, where the linear was (its constants are defined
    just before it)."""
    qweight, scale, bias = (*linear.args[1:], None)[:3]
    kwargs = {key: norm.kwargs[key] for key in ("weight_offset", "cast_before_weight") if key in norm.kwargs}
    if residual is not None:
        kwargs["residual"] = residual
    with graph.inserting_before(linear):
        fused = graph.call_function(kernels.rms_norm_fp8_linear, (x, weight, eps, qweight, scale, bias), kwargs)
    fused.meta.update(linear.meta)
    return fused


def _fuse_plain(ctx: PassContext, norm: fx.Node) -> bool:
    linear = _fp8_consumer(ctx, norm)
    if linear is None:
        return False
    fused = _fused_call(ctx.gm.graph, norm, linear, *norm.args[:3], None)
    linear.replace_all_uses_with(fused)
    ctx.gm.graph.erase_node(linear)
    ctx.gm.graph.erase_node(norm)
    return True


def _fuse_with_residual(ctx: PassContext, norm: fx.Node, position: dict[fx.Node, int]) -> bool:
    graph = ctx.gm.graph
    items = {user.args[1]: user for user in norm.users
             if user.op == "call_function" and user.target is operator.getitem}  # fmt: skip
    if len(items) != len(norm.users) or 0 not in items or set(items) - {0, 1}:
        return False
    linear = _fp8_consumer(ctx, items[0])
    if linear is None:
        return False
    summed_users = list(items[1].users) if 1 in items else []
    if any(position.get(user, -1) < position[linear] for user in summed_users):  # the sum is now made at the linear
        return False
    x, residual, weight, eps = norm.args
    fused = _fused_call(graph, norm, linear, x, weight, eps, residual)
    with graph.inserting_after(fused):
        summed = graph.call_function(operator.getitem, (fused, 1))
    with graph.inserting_after(fused):
        y = graph.call_function(operator.getitem, (fused, 0))
    linear.replace_all_uses_with(y)
    graph.erase_node(linear)
    if 1 in items:
        items[1].replace_all_uses_with(summed)
        graph.erase_node(items[1])
    else:
        graph.erase_node(summed)
    graph.erase_node(items[0])
    graph.erase_node(norm)
    return True


def apply(ctx: PassContext) -> int:
    position = {node: i for i, node in enumerate(ctx.gm.graph.nodes)}
    count = 0
    for norm in list(ctx.gm.graph.nodes):  # each producer: a norm or an activation
        if norm.op != "call_function":
            continue
        if norm.target is kernels.rms_norm and len(norm.args) == 3:
            count += _fuse_plain(ctx, norm)
        elif norm.target is kernels.fused_add_rms_norm and len(norm.args) == 4:
            count += _fuse_with_residual(ctx, norm, position)
        elif norm.target in ACTIVATION_OF:
            count += _fuse_activation(ctx, norm)
    return count
