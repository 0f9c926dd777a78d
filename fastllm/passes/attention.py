"""Attention → fastllm's paged attention over the runtime's KV cache.

Matches `F.scaled_dot_product_attention(q, k, v, ...)` as transformers' SDPA integration calls it for every
model using the attention interface (q [B, Hq, S, D], k/v [B, Hkv, S, D], GQA through `enable_gqa`). The
model's mask is dropped: the runtime's metadata says which cached positions each token sees (causal, plus a
sliding window read from the config). Layers are numbered in graph order, which is the model's layer order.
When q and k come straight from the rotary pass's kernel with the same cos/sin, the rotary embedding moves
into the attention op, where one kernel rotates q and k and writes K/V to the cache.
Only the runtime capture runs this pass; `optimize()`'s drop-in graph keeps HF's own cache and attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

from fastllm import kernels
from fastllm.models.attention import layer_attention
from fastllm.passes._context import PassContext
from fastllm.passes._graph import arg, erase_dead, fake
from fastllm.runtime.attention import attention

NAME = "attention"


def pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """What this pass matches, written out in PyTorch."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def replacement(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    return attention(q, k, v, layer=layer, scale=scale)


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


def apply(ctx: PassContext) -> int:
    graph = ctx.gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        q, k, v = node.args[0], _unrepeat(node.args[1]), _unrepeat(node.args[2])
        if arg(node, 4, "dropout_p", 0.0) != 0.0:
            continue
        scale = arg(node, 6, "scale", None)
        if scale is None:
            scale = 1.0 / math.sqrt(fake(q).shape[-1])
        features = layer_attention(ctx.model_config, count) if ctx.model_config is not None else None
        kwargs = {"layer": count, "scale": float(scale)}
        if features is not None:
            kwargs.update(sliding_window=features.sliding_window, softcap=features.softcap)
        rotary = _shared_rotary(q, k)
        if rotary is not None:
            kwargs.update(cos=rotary["cos"], sin=rotary["sin"], interleaved=rotary["interleaved"])
            q_in, k_in = rotary["q"], rotary["k"]
        else:
            q_in, k_in = q, k
        with graph.inserting_before(node):
            fused = graph.call_function(attention, (q_in, k_in, v), kwargs)
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        repeats = [n for original in node.args[1:3] for n in _chain(original)]
        graph.erase_node(node)
        erase_dead(graph, repeats + ([q, k] if rotary is not None else []))
        count += 1
    return count
