"""Decode GEMMs take in their neighbours: RMSNorms, gated activations and residual adds → `kernels.fused_linear`.

After rms_norm, gated_mlp and skinny_linear, a Llama layer's decode step reads

    n, s = fused_add_rms_norm(residual, skinny_linear(x, W_down))       # the MLP's output joins the residual
    qkv  = skinny_linear(n, W_qkv)
    ...
    h    = silu_and_mul(skinny_linear(n2, W_gate_up))
    out  = skinny_linear(h, W_down)

and becomes

    s    = fused_linear(x, W_down, residual=residual)                   # the add in the GEMM's epilogue
    qkv  = fused_linear(s, W_qkv, prologue="rms_norm", norm_weight=...) # the norm as the GEMM reads s
    out  = fused_linear(gate_up, W_down, prologue="silu")               # SiLU(gate) * up as the GEMM reads it

Three small kernels a layer fewer, each a few microseconds of work and a kernel boundary in the decode CUDA graph
(why: kernels/fused_linear.py). The values are the unfused kernels' (each intermediate rounded where they store it);
steps of more than 16 rows run those kernels one after the other.

A norm is folded into its consumers only if every consumer is a skinny linear without a prologue of its own (each
computes the norm as it reads); a residual add only together with its norm (the norm kernel would otherwise remain).
Quantized linears keep their own launchers and their neighbours stay as they are, unless FUSE_QUANTIZED: then FP8 and
int8 linears (`kernels.fp8_linear`, `int8_linear`: one-byte weights, a scale per output channel) fuse as float ones do,
their weight and scale going to fused_linear (`weight_scale`). int4 linears never do.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from fastllm import kernels
from fastllm.passes._context import PassContext
from fastllm.passes._graph import arg, fake, is_op

NAME = "decode_fusion"
RUNS_AFTER: tuple[str, ...] = ("rms_norm", "gated_mlp", "skinny_linear")
RUNS_BEFORE: tuple[str, ...] = ()  # reference_ops declares it runs after this one
RUNTIME_REQUIRED = False
# Opt-in (passes=(*fastllm.DEFAULT_PASSES, "decode_fusion")): on an H200 (2026-11-30, benchmarks/results/
# W5-fused-linear-*.json and W1-*-decode-fusion.json) a Llama-3.1-8B layer's decode GEMMs took 122 us unfused and
# 122-182 us fused at 1 row (by the prologue's rows of W a program), 139 vs 236 us at 8 rows (the tl.dot form), and
# W1 (whose decode steps run 2 rows: the runner pads a lone row) fell from 201 to 113 tok/s. Only SiLU * up into
# the down projection measured faster (29.5 vs 36.1 us at 1 row, 8 rows of W a program). Every program recomputes the
# prologue for its rows of W: it pays only where a program covers many rows, and that costs the GEMV its bandwidth.
DEFAULT = False
# Off: on an H200 (2026-11-30, W5-quant-gemv-*-actfusion.json) a Llama-3.1-8B down projection at 1 row with SiLU * up
# read inside took 22.8 us against 18.2 for the activation kernel and the GEMV on FP8 weights (int8: 33.5 against
# 21.9), where bf16 gains (29.8 against 35.5), and W1 with FP8 fell from 338 to 323 tok/s. A one-byte weight halves
# the GEMV's bytes, not the prologue's work: every program still computes SiLU * up for its K chunk. Five other
# launch settings (wider blocks of W a program: bench_quant_gemv.PROLOGUE_SWEEP) measured 24.8-32.9 us on FP8 and
# 33.9-43.0 on int8 (W5-quant-gemv-*-sweep-tinygemm.json): none beats the two kernels. The next attempt needs another
# kernel shape (SiLU * up computed once a step into shared memory by a persistent kernel), not other tiles.
FUSE_QUANTIZED = False
# The prologue a folded norm becomes: "rms_norm" (each program reads the whole row for its 1 / rms first, then
# normalises x as the norm kernel rounds it) or "rms_norm_deferred" (x * weight read in fp32, x^2 summed in the loop,
# 1 / rms applied to the product: kernels/skinny_gemm.py). Measured on an H200 (2026-12-02), this pass with the
# deferred form against the default passes (without it), the bf16 decode graph's replay (replay_ab.py, two rounds:
# W1-replay-ab-nvidia-h200-20261202-deferred-norm-*.json): Llama-3.1-8B 3960.0 us with 16 rows of W a program
# (fused_linear.DEFERRED_NORM_BLOCK_N) against 4037.5 (-1.9%), 4052.1 with 8; Llama-2-7B 3749.5 / 3743.8 / 3869.1 with
# 4 / 8 / 16 rows against 3725.4 (+0.6% at best). A layer's GEMM chain alone agreed in sign (bench_deferred_norm.py,
# W5-deferred-norm-nvidia-h200-20261202-rows-sweep.json). Not a default: it loses on one of the two shapes at every
# setting tried; what makes 16 rows pay on the 8B shape's GEMVs and not on Llama-2-7B's is not found (per-GEMV timings
# are the next measurement). Its GPU parity test: tests/test_gpu_parity.py ("deferred norm").
# The default form, "rms_scale_deferred": the deferred form with the norm's weight folded into its consumers' W (each
# W's columns multiplied by offset + w once, in place, and the norm's weight then set so that offset + w = 1: the
# Hugging Face model keeps computing the same function, and a second compile folds nothing more), so the GEMV reads x
# as it is. The parameters change in place (one more rounding of each folded W; the state_dict is no longer the
# checkpoint's): fastllm.release() says so (WeightMerger.folded_norms counts the folds).
# A layer's GEMM chain alone on an H200 (2026-12-03, bench_deferred_norm.py, W5-deferred-norm-nvidia-h200-20261203-
# folded.json): Llama-2-7B 103.0 us against 106.5 for the default chain, Llama-3.1-8B 109.1 against 111.6 (QKV 25.1
# us against 26.9 for the norm kernel + GEMV, the plain GEMV 25.0). Folding is refused for a weight that is also an
# embedding (tied), quantized, or of another dtype than the norm's output. This pass with it against the default passes,
# the bf16 decode graph's replay (H200, 2026-12-03, three rounds, W1-replay-ab-nvidia-h200-20261203-folded-*.json):
# Llama-2-7B 3644.5 us against 3724.5 (-2.1%), Llama-3.1-8B 3953.4 against 4035.3 (-2.0%); 16 rows of W a program
# 3647.0 / 3965.0. The first form that wins on both shapes, and it stays opt-in: the fold costs accuracy. With the pass
# on by default (H200, 2026-12-03, benchmarks/results/gpu-tests-runtime-20261203b-decode-fusion-default.log) every
# runtime GPU test passed but test_gpu_parity's bf16 Llama against the fp32 model: teacher-forced top-1 agreement 0.9746
# where HF eager bf16 reaches 0.9824 (the test allows 0.005 less), relative error 8.17e-3 against 7.83e-3. On the CPU
# the same comparison gives 0.9766 / 8.07e-3 folded, 0.9805 / 7.78e-3 unfolded (the defaults), 0.9805 / 7.83e-3 HF. W *
# w rounded to bf16 takes the place of HF's rounding of the normalised row times w: as many roundings, but (likely why)
# a weight's error is the same on every token where an activation's varies. A default pass must stay as close to the
# fp32 model as Hugging Face's bf16 forward is.
# On the real demo model the fold is not worse (benchmarks/fold_quality.py, CPU, 2026-12-03, against HF fp32): over the
# 279-token test text (fold-quality-smollm2-cpu-20261203.json) relative error 1.99e-2 and top-1 0.9892 with this pass,
# 2.02e-2 / 0.9857 with the defaults, 2.19e-2 / 0.9928 HF bf16; over 4096 tokens of this project's README.md (-2.json)
# 1.179e-2 / 0.9680, 1.158e-2 / 0.9641, 1.182e-2 / 0.9646. The test's measure, examined (fold_quality.py
# --test-models 7, CPU, 2026-12-03, fold-quality-test-llama-cpu-20261203.json: the test's random Llama at seeds 0-6,
# 4096 positions each): top-1 differs from fp32's at 398 of 28,672 positions folded, 391 HF bf16, 390 the defaults:
# no loss of agreement; at 1024 positions the test's 0.5% slack is 5 near-ties, within draw-to-draw noise (HF and the
# defaults differ by up to 6 in 4096 on one model), and seed 0, the test's model, is the fold's worst (83 against 70 of
# 4096). The relative error, though, is higher on every one of the seven models: 1.018-1.042x HF's (mean 1.027x; the
# defaults 0.999x): the extra rounding of W is real and small. The GPU test now scores 4096 positions (it says why),
# and with the pass on by default it fails there too (H200, 2026-12-03, benchmarks/results/gpu-tests-parity-20261203d-
# decode-fusion-default.log): top-1 0.9790 against HF bf16's 0.9841 (21 more positions of 4096 off fp32's), relative
# error within the test's 1.1x; the defaults pass it (gpu-tests-runtime-20261203d.log). So the pass stays opt-in.
# Folding before quantization (for FP8 / int8 linears to take the folded form) measured there too: FP8 W8A8 perplexity
# 1.042x fp32's against 1.002x (per-token activation scales no longer see w's shaping), int8 weight-only 1.003x
# against 1.006x.
NORM_PROLOGUE = "rms_scale_deferred"

# A gated activation node -> its name in the fused kernels ("silu", "gelu", "gelu_tanh"; also fp8_input_quant's).
ACTIVATION_OF = {kernels.silu_and_mul: lambda node: "silu",
                  kernels.gelu_and_mul: lambda node: "gelu" if node.kwargs.get("approximate", "none") == "none"
                  else "gelu_tanh"}


def pattern(x: torch.Tensor, residual: torch.Tensor, w_down: torch.Tensor, norm_weight: torch.Tensor,
            w_next: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What this pass matches (the residual add and norm between two decode GEMMs), written out in PyTorch: the next
    GEMM's output and the new residual."""
    normed, summed = kernels.fused_add_rms_norm(residual, kernels.skinny_linear(x, w_down), norm_weight, eps)
    return kernels.skinny_linear(normed, w_next), summed


def replacement(x: torch.Tensor, residual: torch.Tensor, w_down: torch.Tensor, norm_weight: torch.Tensor,
                w_next: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    summed = kernels.fused_linear(x, w_down, residual=residual)
    return kernels.fused_linear(summed, w_next, prologue="rms_norm", norm_weight=norm_weight, norm_eps=eps), summed


def _linear(node: object) -> dict | None:
    """A skinny or fused linear's (with FUSE_QUANTIZED, an FP8 or int8 one's) arguments as fused_linear's keywords
    (x, weight, bias, ...), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is kernels.skinny_linear and len(node.args) <= 3 and not node.kwargs:
        x, weight, bias = (*node.args, None, None)[:3]
        return {"x": x, "weight": weight, "bias": bias}
    if FUSE_QUANTIZED and node.target in (kernels.fp8_linear, kernels.int8_linear) and len(node.args) in (3, 4) \
            and not node.kwargs:
        x, weight, weight_scale, bias = (*node.args, None)[:4]
        return {"x": x, "weight": weight, "bias": bias, "weight_scale": weight_scale}
    if node.target is kernels.fused_linear:
        x, weight, bias = (*node.args, None, None)[:3]
        return {"x": x, "weight": weight, "bias": bias, **node.kwargs}
    return None


def _replace(graph: fx.Graph, node: fx.Node, spec: dict, before: fx.Node | None = None) -> fx.Node:
    """A fused_linear call from `spec` in place of linear `node` (inserted before `before`, default the node)."""
    args = (spec["x"], spec["weight"], spec["bias"])
    kwargs = {k: v for k, v in spec.items() if k not in ("x", "weight", "bias")}
    with graph.inserting_before(before or node):
        fused = graph.call_function(kernels.fused_linear, args, kwargs)
    fused.meta.update(node.meta)
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    return fused


def fuse_activations(graph: fx.Graph) -> int:
    """Every gated activation read only by a linear without a prologue → that linear with it as its prologue (also
    the decode_act_fusion pass)."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in ACTIVATION_OF or len(node.users) != 1:
            continue
        consumer = next(iter(node.users))
        spec = _linear(consumer)
        if spec is None or spec["x"] is not node or "prologue" in spec:
            continue
        _replace(graph, consumer, {**spec, "x": node.args[0], "prologue": ACTIVATION_OF[node.target](node)})
        graph.erase_node(node)
        count += 1
    return count


def _norm_consumers(normed: fx.Node) -> list[fx.Node] | None:
    """The linears reading `normed` when every user is one without a prologue, reading it as x; else None."""
    users = list(normed.users)
    for user in users:
        spec = _linear(user)
        if spec is None or spec["x"] is not normed or "prologue" in spec or normed in (spec["weight"], spec["bias"]):
            return None
    return users or None


def _norm_options(norm: fx.Node) -> dict:
    weight, eps = norm.args[-2], norm.args[-1]
    if NORM_PROLOGUE == "rms_scale_deferred":  # the weight is folded into the consumers (_fold_weights)
        return {"prologue": NORM_PROLOGUE, "norm_eps": eps}
    return {"prologue": NORM_PROLOGUE, "norm_weight": weight, "norm_eps": eps,
            "norm_offset": norm.kwargs.get("weight_offset", 0.0),
            "norm_cast_before_weight": norm.kwargs.get("cast_before_weight", True)}


def _embedding_storages(ctx: PassContext) -> set[int]:
    """Storages of the graph's embedding tables: a linear weight tied to one must not change."""
    storages = set()
    for node in ctx.gm.graph.nodes:
        if is_op(node, "embedding"):
            table = ctx.weight(arg(node, 1, "weight"))
            if table is not None:
                storages.add(table.untyped_storage().data_ptr())
    return storages


def _foldable(ctx: PassContext, norm: fx.Node, normed: fx.Node, embeddings: set[int]) -> bool:
    """Whether the norm's weight can be folded into every consumer's W: the weight a tensor read by this norm only;
    each consumer a float linear (no weight_scale) of the norm output's dtype whose W no other node reads (a weight
    shared between layers would be folded twice) and is not an embedding table."""
    weight_node = norm.args[-2]
    norm_weight = ctx.weight(weight_node)
    if norm_weight is None or not isinstance(weight_node, fx.Node) or len(weight_node.users) != 1:
        return False
    out = fake(normed)
    for consumer in _norm_consumers(normed):
        spec = _linear(consumer)
        weight = ctx.weight(spec["weight"])
        if weight is None or "weight_scale" in spec or out is None or weight.dtype != out.dtype \
                or not weight.is_floating_point() or weight.untyped_storage().data_ptr() in embeddings \
                or not isinstance(spec["weight"], fx.Node) or len(spec["weight"].users) != 1:
            return False
    return True


@torch.no_grad()
def _fold_weights(ctx: PassContext, norm: fx.Node, normed: fx.Node) -> None:
    """W[:, k] *= offset + w[k] for each consumer (in fp32, rounded once, a block of rows at a time so the fp32 copy
    stays small), then w = 1 - offset: the model computes the same function with the norm's scale in W."""
    norm_weight = ctx.weight(norm.args[-2])
    offset = float(norm.kwargs.get("weight_offset", 0.0))
    scale = offset + norm_weight.float()
    if torch.all(scale == 1.0):  # folded before (a second compile of this model): nothing changes
        return
    ctx.merger.folded_norms += 1
    for consumer in _norm_consumers(normed):
        weight = ctx.weight(_linear(consumer)["weight"])
        for start in range(0, weight.shape[0], 4096):
            rows = weight[start:start + 4096]
            rows.copy_(rows.float() * scale)
    norm_weight.fill_(1.0 - offset)


def _same_dtype(a: object, b: object) -> bool:
    fa, fb = fake(a), fake(b)
    return fa is not None and fb is not None and fa.dtype == fb.dtype


def _fold_norm(graph: fx.Graph, normed: fx.Node, source: fx.Node, options: dict) -> None:
    for consumer in _norm_consumers(normed):
        _replace(graph, consumer, {**_linear(consumer), "x": source, **options})


def _fuse_plain_norms(ctx: PassContext, embeddings: set[int]) -> int:
    graph, count = ctx.gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not kernels.rms_norm or len(node.args) != 3:
            continue
        if _norm_consumers(node) is None or not _same_dtype(node, node.args[0]):
            continue
        if NORM_PROLOGUE == "rms_scale_deferred":
            if not _foldable(ctx, node, node, embeddings):
                continue
            _fold_weights(ctx, node, node)
        _fold_norm(graph, node, node.args[0], _norm_options(node))
        graph.erase_node(node)
        count += 1
    return count


def _getitems(node: fx.Node) -> dict[int, fx.Node] | None:
    """{index: node} of `node`'s users when they are all `getitem`s with distinct indices."""
    items = {}
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem or user.args[1] in items:
            return None
        items[user.args[1]] = user
    return items


def _fuse_residual_norms(ctx: PassContext, embeddings: set[int]) -> int:
    graph, count = ctx.gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not kernels.fused_add_rms_norm or len(node.args) != 4:
            continue
        a, b = node.args[0], node.args[1]
        producer, residual = (b, a) if _single_use_linear(b, node) else (a, b)
        spec = _linear(producer)
        items = _getitems(node)
        if not _single_use_linear(producer, node) or "residual" in spec or items is None or producer is residual:
            continue
        normed, summed = items.get(0), items.get(1)
        if normed is None or _norm_consumers(normed) is None or not _same_dtype(normed, producer):
            continue
        if NORM_PROLOGUE == "rms_scale_deferred":
            if not _foldable(ctx, node, normed, embeddings):
                continue
            _fold_weights(ctx, node, normed)
        fused = _replace(graph, producer, {**spec, "residual": residual}, before=node)
        _fold_norm(graph, normed, fused, _norm_options(node))
        if summed is not None:
            summed.replace_all_uses_with(fused)
            graph.erase_node(summed)
        graph.erase_node(normed)
        graph.erase_node(node)
        count += 1
    return count


def _single_use_linear(node: object, user: fx.Node) -> bool:
    return _linear(node) is not None and list(node.users) == [user]


def apply(ctx: PassContext) -> int:
    graph = ctx.gm.graph
    # Activations first: a down projection that takes SiLU * up in can still take the residual add after it.
    embeddings = _embedding_storages(ctx) if NORM_PROLOGUE == "rms_scale_deferred" else set()
    return fuse_activations(graph) + _fuse_residual_norms(ctx, embeddings) + _fuse_plain_norms(ctx, embeddings)
