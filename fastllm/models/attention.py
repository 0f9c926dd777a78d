"""Per-layer attention features that a model's config declares but its attention call does not show.

The runtime replaces each attention call with paged attention; the scale comes from the call itself, but a
sliding window (Mistral, Gemma-2/3, Qwen with `use_sliding_window`) reaches HF's SDPA only as a mask tensor
and Gemma-2's logit soft-capping only through eager attention. Both are read here from the config, as data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerAttention:
    sliding_window: int | None = None
    softcap: float | None = None


def layer_attention(config, layer_index: int) -> LayerAttention:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        # transformers ≥ 5 lists each layer's kind; only "sliding_attention" layers use the window.
        window = window if layer_types[layer_index] == "sliding_attention" else None
    softcap = getattr(config, "attn_logit_softcapping", None)
    return LayerAttention(sliding_window=int(window) if window else None, softcap=float(softcap) if softcap else None)
