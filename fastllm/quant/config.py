"""Which quantization a model runs with: `QuantConfig`, and the keyword shortcuts that map onto it.

    fastllm.optimize(model, quantization="fp8")                              # == QuantConfig("fp8")
    fastllm.optimize(model, quantization=QuantConfig("int4", group_size=64))

Schemes (weights converted once, at optimize() time):
- "fp8": W8A8 in float8 e4m3: weights per output channel, activations per token, scaled on the fly. On CUDA it needs
  FP8 tensor cores (compute capability 8.9: Ada, Hopper and later).
- "int8": weight-only, symmetric per output channel; activations stay in the model's dtype.
- "int4": weight-only, in groups of `group_size` input channels, two weights a byte: symmetric, or with a zero point
  per group (`zero_point=True`: a group's [min, max] spans the 16 codes; AWQ's and most GPTQ checkpoints' form).
Layers named in `exclude` (default: the LM head, whose errors every token's distribution feels) keep the model's
dtype. So do a MoE model's routers, whatever `exclude` says (their logits pick each token's experts; each family's are
named in `fastllm/models/experts.py`); its experts, 3-D weights in transformers 5, are not quantized (explain() lists
both).
- KV cache "fp8" (`quantization="fp8_kv"`, or `QuantConfig(kv_cache="fp8")` beside any weight scheme): K and V stored
  as float8 e4m3, half the bytes of a bf16 cache; the attention kernels widen them as they read. Unscaled (values
  past 448 saturate), or with a checkpoint's per-layer k_scale / v_scale (compressed-tensors' kv_cache_scheme:
  the cache stores K / k_scale and V / v_scale), or with scales fastllm computes at start-up (`kv_scales="auto"`:
  per-layer powers of two from one calibration prefill, quant/kv_scales.py). Independent of the weights' scheme; on
  CUDA it needs compute capability 8.9 too.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass

WEIGHT_SCHEMES = ("fp8", "int8", "int4")
KV_CACHE_SCHEMES = ("fp8",)
# The keyword shortcuts `quantization=` takes, and what each means.
SHORTCUTS = {"fp8": dict(weights="fp8"), "int8": dict(weights="int8"), "int4": dict(weights="int4"),
             "fp8_kv": dict(weights=None, kv_cache="fp8")}
GROUP_SIZES = (32, 64, 128)
KV_SCALES = (None, "auto")
# Schemes that need FP8 tensor cores on CUDA, and the compute capability that has them.
FP8_SCHEMES = ("fp8",)
FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class QuantConfig:
    """How a model's linear layers are quantized.

    Args:
        weights: "fp8" (W8A8), "int8" or "int4" (weight-only), or None (the weights keep the model's dtype).
        group_size: input channels per int4 scale (32, 64 or 128); ignored by the other schemes.
        exclude: layers that stay unquantized, by module name ("lm_head") or a dotted suffix of it
            ("mlp.down_proj" excludes every layer's down projection).
        kv_cache: None (the model's dtype) or "fp8" (float8 e4m3 K and V).
        zero_point: int4 only: a zero point per group (asymmetric) instead of symmetric codes.
        kv_scales: FP8 KV cache only: None (unscaled, or a quantized checkpoint's scales) or "auto" (per-layer
            power-of-two scales measured at start-up, fastllm/quant/kv_scales.py).
        kv_calibration_ids: with kv_scales="auto", the token ids of the calibration prompt (default: 512
            pseudo-random ids); the first `max_num_batched_tokens` of them are used.
    """

    weights: str | None = "fp8"
    group_size: int = 128
    exclude: tuple[str, ...] = ("lm_head",)
    kv_cache: str | None = None
    zero_point: bool = False
    kv_scales: str | None = None
    kv_calibration_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.weights is not None and self.weights not in WEIGHT_SCHEMES:
            raise ValueError(f"quantization scheme must be one of {WEIGHT_SCHEMES} or None, got {self.weights!r}")
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE_SCHEMES:
            raise ValueError(f"kv_cache must be None or one of {KV_CACHE_SCHEMES}, got {self.kv_cache!r}")
        if self.weights is None and self.kv_cache is None:
            raise ValueError("QuantConfig quantizes nothing: give weights and/or kv_cache")
        if not isinstance(self.zero_point, bool) or (self.zero_point and self.weights != "int4"):
            raise ValueError(f"zero_point (True or False) applies to int4 only; got zero_point={self.zero_point!r} "
                             f"with weights={self.weights!r}")
        # An int, not a float equal to one: the group size shapes tensors (64.0 passed `in GROUP_SIZES`, then crashed
        # the quantize pass's reshape)
        if not isinstance(self.group_size, numbers.Integral) or isinstance(self.group_size, bool) \
                or self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} (an int), got {self.group_size!r}")
        object.__setattr__(self, "group_size", int(self.group_size))
        # A string or None is not a sequence of names (iterating one failed with a TypeError that named nothing);
        # made a tuple before it is checked, so that a generator is read once
        sequence = isinstance(self.exclude, Iterable) and not isinstance(self.exclude, str)
        names = tuple(self.exclude) if sequence else None
        if names is None or not all(isinstance(e, str) and e for e in names):
            raise ValueError(f"exclude must be a tuple of module names (() quantizes every layer, the LM head too), "
                             f"got {self.exclude!r}")
        object.__setattr__(self, "exclude", names)
        self._check_kv_scales()

    def _check_kv_scales(self) -> None:
        if self.kv_scales not in KV_SCALES:
            raise ValueError(f"kv_scales must be one of {KV_SCALES}, got {self.kv_scales!r}")
        if self.kv_scales is not None and self.kv_cache != "fp8":
            raise ValueError(f"kv_scales={self.kv_scales!r} scales an FP8 KV cache: set kv_cache='fp8' too")
        ids = self.kv_calibration_ids
        if ids is None:
            return
        if self.kv_scales != "auto":
            raise ValueError("kv_calibration_ids is the calibration prompt of kv_scales='auto'; set that too")
        # A tokenizer's ids as a tensor or numpy array (return_tensors="pt" / "np"), or numpy's ints, are token ids
        # too (they were refused): read as Python ints; a 2-D one's rows are lists, refused below
        values = ids.tolist() if callable(getattr(ids, "tolist", None)) and not isinstance(ids, (list, tuple)) \
            else ids
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) == 0 or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0
                for t in values):
            raise ValueError(f"kv_calibration_ids must be a non-empty sequence of token ids (ints >= 0), got "
                             f"{ids!r:.80}")
        object.__setattr__(self, "kv_calibration_ids", tuple(int(t) for t in values))

    def excludes(self, module_name: str) -> bool:
        """Whether `module_name` ("model.layers.0.mlp.down_proj") is one of the excluded layers."""
        return any(_names(module_name, e) for e in self.exclude)

    def unmatched_excludes(self, module_names: Iterable[str]) -> list[str]:
        """The entries of `exclude` that name none of `module_names` (a typo there would quantize the layer meant)."""
        module_names = list(module_names)
        return [e for e in self.exclude if not any(_names(name, e) for name in module_names)]

    @property
    def label(self) -> str | None:
        """The weights' scheme as `explain()` names it ("fp8", "int8", "int4-g128", "int4-g128-zp"), None if they are
        not quantized."""
        if self.weights == "int4":
            return f"int4-g{self.group_size}" + ("-zp" if self.zero_point else "")
        return self.weights


def _names(module_name: str, entry: str) -> bool:
    """Whether an `exclude` entry names a module: its whole name, or a dotted suffix of it."""
    return module_name == entry or module_name.endswith("." + entry)


def resolve_quantization(value: object) -> QuantConfig | None:
    """`optimize(quantization=...)`'s value as a QuantConfig: None, a scheme name, or a QuantConfig."""
    if value is None or isinstance(value, QuantConfig):
        return value
    if isinstance(value, str) and value in SHORTCUTS:
        return QuantConfig(**SHORTCUTS[value])
    raise ValueError(f"quantization must be None, one of {tuple(SHORTCUTS)} or a fastllm.QuantConfig, got {value!r}")


def check_device_supports(config: QuantConfig, device) -> None:
    """ValueError naming the card and the schemes it runs when `config` needs FP8 tensor cores it lacks."""
    import torch

    device = torch.device(device)
    if (config.weights not in FP8_SCHEMES and config.kv_cache != "fp8") or device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        others = [s for s in WEIGHT_SCHEMES if s not in FP8_SCHEMES]
        what = config.weights if config.weights in FP8_SCHEMES else "fp8_kv"
        raise ValueError(f"quantization {what!r} needs FP8 tensor cores (compute capability 8.9 or later: "
                         f"Ada, Hopper); {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. "
                         f"Schemes that run on it: {others}")


def slow_path_warning(config: QuantConfig, device) -> str | None:
    """What a user should know before running `config` on `device`, or None: weight-only schemes on CUDA run steps of
    more than 16 tokens (prefill) slower than the model's own dtype (int8 dequantizes every weight on each such call;
    int4 dequantizes tiles inside its GEMM up to 511 tokens, then every weight on each call: H200 figures from
    bench_quant_gemv --prefill, W5-quant-gemv-...-int4-prefill.json)."""
    import torch

    if config.weights == "int8" and torch.device(device).type == "cuda":
        return ("quantization 'int8' on CUDA: decode steps read the quantized weights directly, but steps of more than "
                "16 tokens (prefill) dequantize every weight on each call, which is slower than the model's own dtype "
                "there; 'fp8' runs those on FP8 tensor cores")
    if config.weights == "int4" and torch.device(device).type == "cuda":
        return ("quantization 'int4' on CUDA: decode steps read the packed weights directly; steps of 17 to 511 "
                "tokens (prefill) run a GEMM that dequantizes them as it goes (1.3-2.2x the model's own dtype's time "
                "at 128 tokens on an H200), longer ones dequantize every weight on each call before the model dtype's "
                "GEMM (1.3-1.5x its time at 512 tokens, ~1.1x at 2048); 'fp8' runs those on FP8 tensor cores")
    return None
