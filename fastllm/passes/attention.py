"""Attention → fastllm's paged attention over the runtime's KV cache (the `fastllm::step_attention` op).

Matches `F.scaled_dot_product_attention(q, k, v, ...)` as transformers' SDPA integration calls it for every
model using the attention interface (q [B, Hq, S, D], k/v [B, Hkv, S, D], GQA through `enable_gqa`), and
attention written out as matmul → scale → soft-cap → bias/mask → softmax → matmul (eager_attention.py: Bloom,
MPT, Gemma-2). The model's mask is dropped: the runtime's metadata says which cached positions each token sees
(causal, plus a sliding window read from the config); an ALiBi bias becomes the kernel's ALiBi, with the slopes
the config declares. Layers are numbered in graph order, which is the model's layer order.
When q and k come straight from the rotary pass's kernel with the same cos/sin, the rotary embedding moves
into the attention op, where one kernel rotates q and k and writes K/V to the cache.
The op is emitted by name with the id of the compile step's StepContext (kernels/step_attention.py), which the
runtime fills around each step: this pass knows nothing of the runtime.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

from fastllm import kernels
from fastllm.models.attention import layer_attention
from fastllm.passes import eager_attention
from fastllm.passes._context import PassContext
from fastllm.passes._graph import arg, erase_dead, fake

NAME = "attention"
# After rotary: when q and k come from its kernel, the rotation moves into the attention op.
RUNS_AFTER: tuple[str, ...] = ("rotary",)
RUNS_BEFORE: tuple[str, ...] = ()
# The runtime's graph always runs it (the paged KV cache is written here); optimize()'s drop-in graph never.
RUNTIME_REQUIRED = True


def pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """What this pass matches, written out in PyTorch."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def replacement(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int, layer: int,
                scale: float) -> torch.Tensor:
    return kernels.step_attention(q, k, v, context, layer, scale)


def _unrepeat(node: object) -> object:
    """x for transformers' `repeat_kv(x)`: `x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D)`.

    Models that repeat K/V heads before SDPA (instead of `enable_gqa`) would otherwise have the paged cache
    store every head `n` times over; the paged kernels do grouped-query attention themselves.
    """
    full = slice(None, None, None)
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "reshape"):
        return node
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand"):
        return node
    index = expand.args[0]
    if not (isinstance(index, fx.Node) and index.op == "call_function" and getattr(index.target, "__name__", "")
            == "getitem" and index.args[1] == (full, full, None, full, full)):
        return node
    return index.args[0]


def _chain(node: object) -> list:
    """The reshape/expand/getitem nodes of a `repeat_kv` around `node`, latest first (for erasing)."""
    base = _unrepeat(node)
    if base is node:
        return []
    return [node, node.args[0], node.args[0].args[0]]


def _shared_rotary(q: object, k: object) -> dict | None:
    """{cos, sin, interleaved} and the unrotated q, k when both are rotary kernels over the same cos/sin,
    with cos [1, .., 1, T, R] (one row per token) and nothing else reading the rotated tensors."""
    if not all(isinstance(n, fx.Node) and n.target is kernels.rotary_embedding and len(n.users) == 1
               for n in (q, k)):
        return None
    if q.args[1:] != k.args[1:] or q.kwargs != k.kwargs:
        return None
    cos, x = fake(q.args[1]), fake(q.args[0])
    if cos is None or x is None or any(d != 1 for d in cos.shape[:-2]) or cos.shape[-2] != x.shape[-2]:
        return None
    return {"q": q.args[0], "k": k.args[0], "cos": q.args[1], "sin": q.args[2],
            "interleaved": q.kwargs.get("interleaved", False)}


def _biases_are_declared(additive: list, features) -> bool:
    """Whether the terms added to the scores (masks and biases; an SDPA call's mask is one such term) are masks,
    which the runtime's metadata replace, plus the one ALiBi bias the config declares if it declares one, which
    the kernel applies. A bias the config does not declare, or a declared ALiBi that no term carries, leaves the
    attention to the model: a bias is never dropped as "just a mask" (Falcon folds its ALiBi into the mask)."""
    declared = features is not None and features.alibi_slopes is not None
    biases = [t for t in additive if not eager_attention.looks_like_mask(t)]
    return len(biases) == (1 if declared else 0)


def _eager_kwargs(found: eager_attention.EagerAttention, features) -> dict | None:
    """Keyword arguments of the paged attention for a matched eager attention, or None if its additive terms
    are not masks plus the declared ALiBi."""
    if not _biases_are_declared(found.additive, features):
        return None
    return {"scale": found.scale, "softcap": found.softcap,
            "alibi": features.alibi_slopes if features is not None else None,
            "sliding_window": features.sliding_window if features is not None else None}


def apply(ctx: PassContext) -> int:
    if ctx.step_context is None:
        raise ValueError("the attention pass needs the id of the step context its ops read (PassContext.step_context)")
    graph = ctx.gm.graph
    count = 0
    for node in list(graph.nodes):
        if getattr(node, "_erased", False) or node.op not in ("call_function", "call_method"):
            continue
        is_sdpa = node.target is F.scaled_dot_product_attention
        found = None if is_sdpa else eager_attention.match(node)
        if (is_sdpa and arg(node, 4, "dropout_p", 0.0) != 0.0) or (not is_sdpa and found is None):
            continue
        features = layer_attention(ctx.model_config, count) if ctx.model_config is not None else None
        if is_sdpa:
            mask = arg(node, 3, "attn_mask", None)
            if not _biases_are_declared([] if mask is None else [mask], features):
                continue
            q, k, v, output = node.args[0], node.args[1], node.args[2], node
            scale = arg(node, 6, "scale", None)
            kwargs = {"scale": float(scale) if scale is not None else 1.0 / math.sqrt(fake(q).shape[-1])}
            if features is not None:
                kwargs.update(sliding_window=features.sliding_window, softcap=features.softcap,
                              alibi=features.alibi_slopes)
            replaced = [node]
        else:
            kwargs = _eager_kwargs(found, features)
            if kwargs is None:
                continue
            q, k, v, output, replaced = found.q, found.k, found.v, found.output, [found.output, *found.replaced]
        k_base, v_in = _unrepeat(k), _unrepeat(v)
        layer = count
        kwargs = {name: value for name, value in kwargs.items() if value is not None}
        scale = kwargs.pop("scale")
        rotary = _shared_rotary(q, k_base)
        q_in, k_in = (rotary["q"], rotary["k"]) if rotary is not None else (q, k_base)
        if rotary is not None:
            kwargs.update(cos=rotary["cos"], sin=rotary["sin"], interleaved=rotary["interleaved"])
        with graph.inserting_before(output):
            fused = graph.call_function(kernels.step_attention, (q_in, k_in, v_in, ctx.step_context, layer, scale),
                                        kwargs)
            result = fused
            if fake(output).dim() == 3:  # [B * H, S, D] (Bloom): the runtime's batch is one row, B = 1
                result = graph.call_method("flatten", (fused, 0, 1))
        result.meta.update(output.meta)
        if result is not fused:
            fused.meta.update({key: value for key, value in output.meta.items() if key != "example_value"})
        output.replace_all_uses_with(result)
        dead = replaced + _chain(k) + _chain(v) + ([q, k_base] if rotary is not None else [])
        erase_dead(graph, list(dict.fromkeys(dead)))
        count += 1
    return count
