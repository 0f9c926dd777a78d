"""Per-layer attention features that a model's config declares but its attention call does not show.

The runtime replaces each attention call with paged attention; the scale comes from the call itself, but a
sliding window (Mistral, Gemma-2/3, Qwen with `use_sliding_window`) reaches HF's SDPA only as a mask tensor,
Gemma-2's logit soft-capping only through eager attention, and ALiBi (Bloom, MPT, Falcon-RW) as a bias tensor
added to the scores (Falcon folds it into its SDPA mask). They are read here from the config, as data: the ALiBi
slopes per model type, by each family's formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerAttention:
    sliding_window: int | None = None
    softcap: float | None = None
    alibi_slopes: tuple[float, ...] | None = None  # per query head: score += slope * (key pos - query pos)


def geometric_alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """The ALiBi paper's slopes (Bloom): 2^(-8i/n) for the largest power of two n <= heads, then every other
    slope of the next power of two for the remaining heads."""
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [2 ** (-8 * i / n) for i in range(1, n + 1)]
    extra = [2 ** (-4 * i / n) for i in range(1, 2 * (num_heads - n), 2)]
    return tuple(slopes + extra)


def mpt_alibi_slopes(num_heads: int, bias_max: float = 8) -> tuple[float, ...]:
    """MPT's slopes: 2^(-bias_max * i / p) for the next power of two p >= heads; when p > heads, the odd-indexed
    slopes first, then the even ones, cut to `num_heads` (MPT's own ordering, not Bloom's)."""
    p = 2 ** math.ceil(math.log2(num_heads))
    slopes = [2 ** (-bias_max * i / p) for i in range(1, p + 1)]
    if p != num_heads:
        slopes = (slopes[1::2] + slopes[::2])[:num_heads]
    return tuple(slopes)


def _mpt_slopes(config) -> tuple[float, ...] | None:
    attn = getattr(config, "attn_config", None)
    if attn is None or not getattr(attn, "alibi", False):
        return None
    return mpt_alibi_slopes(config.n_heads, getattr(attn, "alibi_bias_max", 8))


def _falcon_slopes(config) -> tuple[float, ...] | None:
    """Falcon (`alibi=True`, e.g. Falcon-RW) adds Bloom's bias to the scores before scaling them by
    1/sqrt(head_dim) (its SDPA path folds alibi / sqrt(head_dim) into the mask): Bloom's slopes, scaled."""
    if not getattr(config, "alibi", False):
        return None
    scale = 1.0 / math.sqrt(config.hidden_size // config.num_attention_heads)
    return tuple(slope * scale for slope in geometric_alibi_slopes(config.num_attention_heads))


# model_type -> the layer's ALiBi slopes from its config (None: the model does not use ALiBi).
ALIBI = {
    "bloom": lambda config: geometric_alibi_slopes(config.n_head),
    "mpt": _mpt_slopes,
    "falcon": _falcon_slopes,
}


def layer_attention(config, layer_index: int) -> LayerAttention:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        # transformers ≥ 5 lists each layer's kind; only "sliding_attention" layers use the window.
        window = window if layer_types[layer_index] == "sliding_attention" else None
    softcap = getattr(config, "attn_logit_softcapping", None)
    alibi = ALIBI.get(getattr(config, "model_type", None), lambda _: None)(config)
    return LayerAttention(sliding_window=int(window) if window else None, softcap=float(softcap) if softcap else None,
                          alibi_slopes=alibi)
