"""Linear → quantized linear, when the model is optimized with `quantization=` (`fastllm/quant/config.py`).

Each linear whose weight is a model parameter (or a merged QKV / gate-up weight) and whose layer is not excluded
becomes `kernels.fp8_linear`, `int8_linear` or `int4_linear` on the weight quantized once, here (the quantized
tensors become constants of the graph). Layers are named by their modules (`model.layers.0.self_attn.q_proj`; a
merged weight by its parts, joined with "+"); a merged weight is quantized only if none of its parts is excluded,
and an `exclude` entry that names none of the graph's linears is warned about (it excludes nothing).
A layer the scheme cannot take (int4 with in-features not a multiple of the group size) stays in the model's dtype
and is reported so. A MoE family's routers (declared in `models/experts.py`) stay in the model's dtype whatever
`exclude` says, and are reported so; its experts (3-D weights, one matrix per expert) are no linears of this pass and
are reported as not quantized. Without `quantization` this pass changes nothing.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fastllm import kernels
from fastllm.models import experts as moe
from fastllm.passes._context import PassContext
from fastllm.passes._graph import arg, is_op
from fastllm.quant import fp8, int_weight
from fastllm.quant.resident import QuantizedRows

NAME = "quantize"
# After the passes that merge linears (it quantizes the merged weights), before skinny_linear (which takes the
# linears left in the model's dtype).
RUNS_AFTER: tuple[str, ...] = ("gated_mlp", "qkv")
RUNS_BEFORE: tuple[str, ...] = ("skinny_linear",)
RUNTIME_REQUIRED = True

LAUNCHERS = {"fp8": kernels.fp8_linear, "int8": kernels.int8_linear, "int4": kernels.int4_linear}


def pattern(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def replacement(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    return kernels.fp8_linear(x, qweight, weight_scale)


def quantized_tensors(weight: torch.Tensor, scheme: str, group_size: int,
                      zero_point: bool = False) -> tuple[torch.Tensor, ...]:
    """The tensors a scheme's linear takes in place of `weight`: (qweight, scale), or for int4 with zero points
    (packed, scales, zeros)."""
    if scheme == "fp8":
        return fp8.quantize_weight(weight)
    if scheme == "int8":
        return int_weight.quantize_int8(weight)
    return int_weight.quantize_int4(weight, group_size, zero_point=zero_point)


def apply(ctx: PassContext) -> int:
    config = ctx.quantization
    if config is None or config.weights is None:  # not quantized, or only the KV cache (the runner's business)
        return 0
    count = 0
    layout = moe.moe_layout(ctx.model_config)
    left = _as_linears(ctx, config, layout)
    counters = _split_counters(ctx) if config.weights == "int4" else None
    _warn_unmatched_excludes(ctx, config, left)
    for node, weight in ctx.linears():
        if not weight.is_floating_point():
            continue
        names = ctx.module_names(weight)
        layer = "+".join(names)
        if any(moe.is_router(layout, n) for n in names):
            ctx.quantized_layers[layer] = _router_reason(weight)
            continue
        if not names or any(config.excludes(n) for n in names):
            continue
        if ctx.prequantized is not None:  # a quantized checkpoint: its tensors, as they are
            found = _from_checkpoint(ctx, layer, names, weight)
            if found is None:
                continue
            tensors, order = found
            _replace(ctx, node, config.weights, tensors, order, counters)
            _record_rows(ctx, names, weight, config.weights, tensors, order)
            ctx.quantized_layers[layer] = _checkpoint_label(config, tensors)
            count += 1
            continue
        if config.weights == "int4" and weight.shape[1] % config.group_size:
            ctx.quantized_layers[layer] = f"not quantized: in-features {weight.shape[1]} not a multiple of " \
                                          f"group size {config.group_size}"
            continue
        key = (weight.data_ptr(), tuple(weight.shape), config.weights, config.group_size, config.zero_point)
        if key not in ctx.merger.quantized:  # one quantized copy per weight, however many graphs use it
            ctx.merger.quantized[key] = quantized_tensors(weight, config.weights, config.group_size,
                                                          config.zero_point)
        _replace(ctx, node, config.weights, ctx.merger.quantized[key], counters=counters)
        _record_rows(ctx, names, weight, config.weights, ctx.merger.quantized[key])
        ctx.quantized_layers[layer] = config.label
        count += 1
    _report_experts(ctx, layout)
    return count


def _router_reason(weight: torch.Tensor) -> str:
    dtype = str(weight.dtype).removeprefix("torch.")
    return (f"not quantized: MoE router, kept in {dtype} (its outputs choose and weigh each token's experts, and "
            f"rounding them can send tokens to other experts; its {weight.shape[0]}x{weight.shape[1]} weights are too "
            f"few to save memory on)")


def _report_experts(ctx: PassContext, layout: moe.MoeLayout | None) -> None:
    """List a MoE model's experts as not quantized: transformers 5 keeps them as 3-D parameters (one matrix per
    expert) that no linear of this pass reads, so they run in the model's dtype; unlisted, explain() showed a model
    whose every listed layer was quantized while most of its weights were not. A model with such weights whose family
    `models/experts.py` does not describe is warned about: its routers were quantized like any linear."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in ctx.parameters.items():
        module, _, leaf = name.rpartition(".")
        # Fused experts are bare parameters of their module (gate_up_proj, down_proj); a convolution's 3-D kernel
        # (Mamba's conv1d) is a `.weight`
        if param.dim() >= 3 and param.is_floating_point() and leaf != "weight":
            by_module.setdefault(module, {})[leaf] = param
    if not by_module:
        return
    if layout is None:
        model_type = getattr(ctx.model_config, "model_type", None)
        example = next(iter(by_module))
        warnings.warn(f"fastllm: {model_type!r} is a mixture-of-experts model (its {example} holds 3-D expert weights) "
                      f"that fastllm/models/experts.py does not describe: its routers are quantized like any linear "
                      f"(their rounding can send tokens to other experts) and its experts are not quantized; name its "
                      f"routers in QuantConfig(exclude=...) to keep them in the model's dtype",
                      RuntimeWarning, stacklevel=2)
        return
    for module, params in by_module.items():
        if not moe.is_experts(layout, module):
            continue
        shapes = ", ".join(f"{leaf} {list(p.shape)}" for leaf, p in sorted(params.items()))
        num_experts = next(iter(params.values())).shape[0]
        dtype = str(next(iter(params.values())).dtype).removeprefix("torch.")
        ctx.quantized_layers[module] = (f"not quantized: {num_experts} experts' weights ({shapes}: 3-D, one matrix per "
                                        f"expert) run in {dtype}; fastllm quantizes 2-D linear weights only")


def _weight_matmul(ctx: PassContext, node) -> tuple | None:
    """(x, weight node, transposed view or None, bias node or None) when `node` multiplies its input by a model
    parameter's weight without F.linear: GPT-2's Conv1D, `addmm(bias, x, W)` with W [K, N], or Falcon's
    `x @ W.T` with W [N, K]; else None."""
    if node.op != "call_function":
        return None
    if node.target is torch.addmm and len(node.args) == 3 and all(node.kwargs.get(k, 1) == 1
                                                                    for k in ("beta", "alpha")) \
            and set(node.kwargs) <= {"beta", "alpha"}:
        bias, x, w = node.args
        weight, b = ctx.weight(w), ctx.tensor(bias)
        if weight is not None and weight.dim() == 2 and (b is None or b.shape == (weight.shape[1],)) \
                and ctx.module_names(weight):
            return x, w, weight.t(), bias
        return None
    if is_op(node, "matmul") and len(node.args) == 2 and not node.kwargs:
        x, t = node.args
        transposed = isinstance(t, torch.fx.Node) and (
            (t.op == "call_function" and t.target is getattr and t.args[1:] in (("T",), ("mT",)))
            or (is_op(t, "transpose") and set(t.args[1:]) in ({0, 1}, {-1, -2}))
            or (t.op in ("call_function", "call_method") and t.target in (torch.t, "t") and len(t.args) == 1))
        weight = ctx.weight(t.args[0]) if transposed else None
        if weight is not None and weight.dim() == 2 and ctx.module_names(weight):
            return x, t.args[0], None, None
    return None


def _as_linears(ctx: PassContext, config, layout: moe.MoeLayout | None = None) -> set[str]:
    """Model weights multiplied without F.linear (GPT-2's Conv1D, Falcon's FalconLinear: `x @ W.T`) were quantized by
    nobody: `quantization=` left every layer of those models in their dtype, silently, and explain() listed none.
    The layers this pass will take become F.linear calls on their [N, K] weight (a Conv1D's a transposed view of its
    parameter), which the loop in `apply` then quantizes like any other; the others are left as they are. Returns
    the names of the layers left (an `exclude` entry that names one is no typo)."""
    left: set[str] = set()
    for node in list(ctx.gm.graph.nodes):
        found = _weight_matmul(ctx, node)
        if found is None:
            continue
        x, weight_node, transposed, bias = found
        weight = transposed if transposed is not None else ctx.weight(weight_node)
        names = ctx.module_names(weight)
        if any(config.excludes(n) or moe.is_router(layout, n) for n in names) or (
                ctx.prequantized is not None and not all(n in ctx.prequantized.layers for n in names)):
            left.update(names)
            continue
        layer = "+".join(names)
        if ctx.prequantized is None and config.weights == "int4" and weight.shape[1] % config.group_size:
            ctx.quantized_layers[layer] = f"not quantized: in-features {weight.shape[1]} not a multiple of " \
                                          f"group size {config.group_size}"
            continue
        with ctx.gm.graph.inserting_before(node):
            w = ctx.constant(transposed, before=node) if transposed is not None else weight_node
            linear = ctx.gm.graph.call_function(F.linear, (x, w, bias))
        linear.meta.update(node.meta)
        old_weight = node.args[1]
        node.replace_all_uses_with(linear)
        ctx.gm.graph.erase_node(node)
        if old_weight.op != "placeholder" and not old_weight.users:  # the `.T` / `.t()` that fed the matmul
            ctx.gm.graph.erase_node(old_weight)
    return left


def _warn_unmatched_excludes(ctx: PassContext, config, others: set[str] = frozenset()) -> None:
    """A warning naming the `exclude` entries that match none of the graph's linear layers: such an entry keeps
    nothing in the model's dtype, and the layer it was meant for (a typo, a name of another model) is quantized."""
    names = {name for _, weight in ctx.linears() for name in ctx.module_names(weight)} | set(others)
    unmatched = config.unmatched_excludes(names)
    if names and unmatched:
        example = max(sorted(names), key=lambda name: name.count("."))  # the first of the deepest names
        warnings.warn(f"fastllm: QuantConfig exclude entries {unmatched} name none of {len(names)} linear layers of "
                      f"this model, so they exclude nothing; give a layer's module name or a dotted suffix of it "
                      f"(e.g. {example!r} or {'.'.join(example.split('.')[-2:])!r})",
                      RuntimeWarning, stacklevel=2)


def _split_counters(ctx: PassContext) -> torch.Tensor | None:
    """The int4 decode kernel's split counters for this graph's int4 linears (`kernels.int4_linear`), on CUDA: zeros,
    one per 16 outputs of the widest linear; the graph holds them, so they go with the model. Its linears run one
    after another and each leaves them zero, so one buffer serves them all."""
    weights = [weight for _, weight in ctx.linears()]
    if not weights or not weights[0].is_cuda:  # elsewhere the references run (reference_ops), which take none
        return None
    widest = max(weight.shape[0] for weight in weights)
    return torch.zeros(-(-widest // 16), dtype=torch.int32, device=weights[0].device)


def _replace(ctx: PassContext, node, scheme: str, tensors: tuple[torch.Tensor, ...],
             order: torch.Tensor | None = None, counters: torch.Tensor | None = None) -> None:
    """`node` (a linear) -> the scheme's quantized linear on `tensors`, which become constants of the graph. The
    launchers take (x, weight, scale, bias, *rest): int4's zero points come after the bias, and its split counters
    (`counters`, shared by the graph's int4 linears) as a keyword. With `order` (act-order GPTQ: the input channels'
    order the tensors hold), x is gathered into that order first. A float weight constant (a merged QKV / gate-up
    weight) that nothing else reads leaves the graph, so the graph does not keep it alive."""
    graph = ctx.gm.graph
    constants = [ctx.constant(t, before=node) for t in tensors]
    x = node.args[0]
    if order is not None:
        order_constant = ctx.constant(order, before=node)
        with graph.inserting_before(node):
            x = graph.call_function(torch.index_select, (x, -1, order_constant))
    kwargs = {} if counters is None else {"split_counters": ctx.constant(counters, before=node)}
    with graph.inserting_before(node):
        quantized = graph.call_function(LAUNCHERS[scheme], (x, *constants[:2], arg(node, 2, "bias"),
                                                            *constants[2:]), kwargs)
    quantized.meta.update(node.meta)
    weight = arg(node, 1, "weight")
    node.replace_all_uses_with(quantized)
    graph.erase_node(node)
    if weight.op == "get_attr" and not weight.users:
        graph.erase_node(weight)
        if not any(n.op == "get_attr" and n.target == weight.target for n in graph.nodes):
            delattr(ctx.gm, weight.target)


def _record_rows(ctx: PassContext, names: list[str], weight: torch.Tensor, scheme: str,
                 tensors: tuple[torch.Tensor, ...], order: torch.Tensor | None = None) -> None:
    """Which rows of the quantized tensors each module owns (a merged weight's parts are views at their row offsets),
    for `quant.resident.release_float_weights` once the step is compiled."""
    k = weight.shape[1]
    for name in names:
        part = ctx.parameters.get(name + ".weight")
        if part is None or part.dim() != 2:
            continue
        if len(names) == 1 and part.shape != weight.shape and part.t().shape == weight.shape:
            # a Conv1D's weight [K, N], quantized as its transpose (_as_linears): all N rows are this module's
            ctx.merger.quantized_rows[name] = QuantizedRows(LAUNCHERS[scheme], tensors, 0, weight.shape[0], order)
            continue
        row0 = (part.storage_offset() - weight.storage_offset()) // k
        ctx.merger.quantized_rows[name] = QuantizedRows(LAUNCHERS[scheme], tensors, row0, part.shape[0], order)


def _checkpoint_label(config, tensors: tuple[torch.Tensor, ...]) -> str:
    """The scheme's label; a block-scaled FP8 weight's names its block ("fp8-block128x128"; its blocks tile it)."""
    if config.weights == "fp8" and tensors[1].dim() == 2:
        (n, k), (rows, cols) = tensors[0].shape, tensors[1].shape
        return f"fp8-block{n // rows}x{k // cols}"
    return config.label


def _from_checkpoint(ctx: PassContext, layer: str, names: list[str], weight: torch.Tensor):
    """(the checkpoint's tensors for a linear, the input order they hold or None) -- a merged linear's parts
    concatenated along the output dim (per-channel scales concatenate exactly) -- or None when the checkpoint left
    it unquantized, or its parts cannot share one kernel (reported)."""
    found = [ctx.prequantized.layers.get(n) for n in names]
    if all(t is None for t in found):
        # Quantized in the checkpoint but run dequantized (a block-wise FP8 weight its blocks do not tile): said so,
        # as for a merged layer with such a part (a layer alone was listed nowhere)
        reasons = [(n, ctx.prequantized.unquantized[n]) for n in names if n in ctx.prequantized.unquantized]
        if reasons:
            ctx.quantized_layers[layer] = reasons[0][1] if len(names) == 1 else "not quantized: " + "; ".join(
                f"{n}: {why.removeprefix('not quantized: ')}" for n, why in reasons)
        return None
    if any(t is None for t in found):
        missing = [n for n, t in zip(names, found) if t is None]
        ctx.quantized_layers[layer] = f"not quantized: the checkpoint quantized only some parts (not {missing})"
        return None
    orders = [ctx.prequantized.input_orders.get(n) for n in names]
    if not all(_same_order(o, orders[0]) for o in orders[1:]):
        # GPTQ orders a layer's input channels by its input's statistics, the same for the parts of one merged
        # linear (they read the same input); a checkpoint where they differ runs these parts unquantized
        ctx.quantized_layers[layer] = "not quantized: its parts hold their input channels in different act-orders"
        return None
    if len(found) == 1:
        tensors = found[0]
    else:  # merged parts appear in the order the merged weight holds them (block-scaled parts tile their blocks)
        order = sorted(range(len(names)), key=lambda i: ctx.parameters[names[i] + ".weight"].storage_offset())
        tensors = tuple(torch.cat([found[i][j] for i in order]) for j in range(len(found[0])))
    input_order = None if orders[0] is None else orders[0].to(weight.device)
    return tuple(t.to(weight.device) for t in tensors), input_order


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two parts' act-orders (None: the natural order) are the same."""
    return a is b or (a is not None and b is not None and torch.equal(a, b))
