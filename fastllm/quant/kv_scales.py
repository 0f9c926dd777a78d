"""FP8 KV cache scales that fastllm computes itself (`QuantConfig(kv_cache="fp8", kv_scales="auto")`).

The cache stores K / k_scale and V / v_scale in float8 e4m3 (the attention kernels multiply back as they read).
Unscaled, a K or V value past 448 saturates, and values under 2^-6 fall into e4m3's subnormals, which keep fewer
bits; a model whose keys run to the hundreds, or whose values are all small, loses precision to one or the other.
`kv_scales="auto"` measures each layer's largest |K| (after rotary, as the cache holds it) and |V| over one
calibration prefill at start-up, and picks per layer the power-of-two scale that puts that largest value at most
448 / HEADROOM. Powers of two because dividing by one is exact: the scaled cache holds the same values as the
unscaled one, moved in exponent only, so a scale can cost no precision where the values fit. HEADROOM leaves two
binades above the calibration's largest value for text that runs larger (on SmolLM2-135M, 512 random tokens gave
per-layer maxima within 1.5x of a real text's: benchmarks/quant_quality.py's "fp8_kv_long_context" measures the
effect).

The calibration prefill runs the model's own step, eagerly, on `kv_calibration_ids` or else CALIBRATION_TOKENS
pseudo-random token ids (seeded: the same scales every start).
"""

from __future__ import annotations

import math

import torch

FP8_KV_MAX = 448.0  # float8 e4m3's largest finite value
HEADROOM = 4.0
CALIBRATION_TOKENS = 512


def calibration_ids(vocab_size: int, num_tokens: int = CALIBRATION_TOKENS) -> list[int]:
    """Deterministic pseudo-random token ids (the calibration prompt when the user gives none)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (num_tokens,), generator=generator).tolist()


def power_of_two_scale(amax: float) -> float:
    """The power of two s with amax / s <= FP8_KV_MAX / HEADROOM, the smallest such (1.0 for amax 0: nothing
    was measured, so nothing moves)."""
    if not math.isfinite(amax) or amax < 0:
        raise ValueError(f"the calibration measured a non-finite or negative K/V magnitude ({amax}); the model's "
                         "activations overflow before its KV cache")
    if amax == 0:
        return 1.0
    return 2.0 ** math.ceil(math.log2(amax * HEADROOM / FP8_KV_MAX))


def scales_from_amax(amax: torch.Tensor) -> list[tuple[float, float]]:
    """[num_layers, 2] largest |K|, |V| per layer -> [(k_scale, v_scale)] per layer."""
    return [(power_of_two_scale(float(k)), power_of_two_scale(float(v))) for k, v in amax.tolist()]


__all__ = ["CALIBRATION_TOKENS", "FP8_KV_MAX", "HEADROOM", "calibration_ids", "power_of_two_scale",
           "scales_from_amax"]
