"""Attention → fastllm's paged attention over the runtime's KV cache.

Matches `F.scaled_dot_product_attention(q, k, v, ...)` as transformers' SDPA integration calls it for every
model using the attention interface (q [B, Hq, S, D], k/v [B, Hkv, S, D], GQA through `enable_gqa`). The
model's mask is dropped: the runtime's metadata says which cached positions each token sees (causal, plus a
sliding window read from the config). Layers are numbered in graph order, which is the model's layer order.
Only the runtime capture runs this pass; `optimize()`'s drop-in graph keeps HF's own cache and attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastllm.models.attention import layer_attention
from fastllm.passes._context import PassContext
from fastllm.passes._graph import arg, fake
from fastllm.runtime.attention import attention

NAME = "attention"


def pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """What this pass matches, written out in PyTorch."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def replacement(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    return attention(q, k, v, layer=layer, scale=scale)


def apply(ctx: PassContext) -> int:
    graph = ctx.gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        q, k, v = node.args[:3]
        if arg(node, 4, "dropout_p", 0.0) != 0.0:
            continue
        scale = arg(node, 6, "scale", None)
        if scale is None:
            scale = 1.0 / math.sqrt(fake(q).shape[-1])
        features = layer_attention(ctx.model_config, count) if ctx.model_config is not None else None
        kwargs = {"layer": count, "scale": float(scale)}
        if features is not None:
            kwargs.update(sliding_window=features.sliding_window, softcap=features.softcap)
        with graph.inserting_before(node):
            fused = graph.call_function(attention, (q, k, v), kwargs)
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        count += 1
    return count
