"""Checkpoints that are already quantized: loaded as they are, their quantized weights used without re-quantizing.

Supported, each mapping exactly onto a fastllm scheme:
- compressed-tensors' "float-quantized" FP8 layout (what llm-compressor writes, and what most "-FP8" models on the Hub
  are): `quant_method == "compressed-tensors"`, 8-bit float weights with one scale per output channel or one per
  tensor (`<layer>.weight` in float8 e4m3, `<layer>.weight_scale` [N, 1] or [1]), activations dynamic per token or not
  quantized -> "fp8" (a per-tensor scale is the same scale for every channel).
- GPTQ, 4 bits (`quant_method == "gptq"`, group size 32/64/128, the "gptq" checkpoint format): `<layer>.qweight`
  int32 [K / 8, N] (input channel 8r + i in nibble i of row r), `<layer>.scales` [K / g, N], `<layer>.qzeros` int32
  [K / g, N / 8] (output channel 8c + j in nibble j; the format stores zero - 1) -> "int4" with that group size;
  symmetric checkpoints (every zero 8) without zero points. With act-order (`desc_act: true`), `<layer>.g_idx` [K]
  names each input channel's group, in an order of its own: the input channels are reordered group by group (the
  codes move with them, exactly) and the layer's input is gathered into that order at run time
  (`Prequantized.input_orders`).
- AWQ, 4 bits, GEMM layout (`quant_method == "awq"`, `version: "gemm"`, zero points): `<layer>.qweight` int32
  [K, N / 8] and `<layer>.qzeros` int32 [K / g, N / 8], output channel 8c + AWQ_ORDER[i] in nibble i of column c,
  `<layer>.scales` [K / g, N] -> "int4" with zero points.
  With a `kv_cache_scheme` (float 8-bit, one static scale per tensor): `<layer>.self_attn.k_scale` / `v_scale`, the
  multipliers of an FP8 KV cache (real = stored x scale) -> the model runs an FP8 KV cache with those scales.
- transformers' "fp8" method (block-wise FP8, DeepSeek-V3's layout: `quant_method == "fp8"`, `weight_block_size`
  [bn, bk], dynamic activations): `<layer>.weight` float8 e4m3 and `<layer>.weight_scale_inv` [ceil(N / bn),
  ceil(K / bk)], the multiplier of each block -> "fp8" with block scales, run weight-only: steps of up to 16 rows
  (decode) read the block-scaled weights in the skinny GEMM; larger ones (prefill) on CUDA dequantize each weight on
  every call (slower than the model's dtype there; a warning says so).
GPTQ and AWQ quantize GPT-2's Conv1D (weight [K, N]) as the Linear it is, so its tensors are laid out as above for
the transposed weight; the Conv1D gets its dequantized weight back in its own layout.
Other layouts (static activation scales, AWQ GEMV) are refused with what is supported.

The model's own weights are the dequantized ones, in `dtype` (Hugging Face's forward runs on them until the model is
optimized); the quantized tensors ride on the model as `_fastllm_prequantized` until `optimize()` hands them to the
quantize pass, after which the dequantized weights of the layers it took are let go (quant/resident.py).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field

import torch

from fastllm.quant.fp8 import FP8, dequantize_blocks
from fastllm.quant.int_weight import dequantize_int4
from fastllm.quant.resident import is_conv1d


@dataclass
class Prequantized:
    """A checkpoint's quantized layers: module name -> the scheme's tensors (fp8: qweight [N, K], scale [N] fp32)."""

    scheme: str
    layers: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    source: str = ""
    group_size: int = 128  # int4
    zero_point: bool = False  # int4: the layers carry zero points (asymmetric)
    # An FP8 KV cache's (k_scale, v_scale) per layer, in layer order (compressed-tensors' kv_cache_scheme), or None
    kv_scales: list[tuple[float, float]] | None = None
    # Act-order GPTQ: module name -> the order of its input channels its quantized tensors hold (int64 [K]); the
    # layer computes x[..., order] @ W[:, order]^T, which is x @ W^T
    input_orders: dict[str, torch.Tensor] = field(default_factory=dict)
    # Layers the checkpoint quantized that fastllm runs on their dequantized weights: module name -> why (a
    # block-wise FP8 weight its blocks do not tile), for explain() (such a layer was listed nowhere)
    unquantized: dict[str, str] = field(default_factory=dict)


SUPPORTED = ("compressed-tensors FP8 (float 8-bit weights per channel or per tensor, activations dynamic per token or "
             "unquantized), transformers' block-wise FP8 (quant_method 'fp8', dynamic activations), GPTQ 4-bit "
             "(with or without act-order) and AWQ 4-bit GEMM (group size 32, 64 or 128)")
BLOCK_FP8_WARNING = ("block-wise FP8 checkpoint: steps of up to 16 tokens read the block-scaled FP8 weights "
                     "directly, steps of up to 128 in bf16/fp16 too (a GEMM dequantizing its tiles), but larger "
                     "steps on CUDA (prefills; fp32 past 16 tokens) dequantize each weight into a temporary on every "
                     "call, then multiply in the model's dtype (slower than a checkpoint in that dtype there); its "
                     "weights are used as they are, never re-quantized")
# AWQ packs output channel 8c + AWQ_ORDER[i] into nibble i of column c.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def checkpoint_scheme(quantization_config) -> tuple[str, int]:
    """(fastllm scheme, int4 group size) a checkpoint's `quantization_config` maps onto; ValueError saying what is
    supported."""
    qc = _as_dict(quantization_config)
    method = qc.get("quant_method")
    supported = SUPPORTED
    if method == "gptq":
        return "int4", _gptq_group_size(qc)
    if method == "awq":
        return "int4", _awq_group_size(qc)
    if method == "fp8":  # transformers' FineGrainedFP8: block-wise weights
        block = qc.get("weight_block_size")
        if qc.get("activation_scheme", "dynamic") != "dynamic" or not (
                isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                            for b in block)):
            raise ValueError(f"FP8 checkpoint with activation_scheme {qc.get('activation_scheme')!r} and "
                             f"weight_block_size {block!r} is not supported; fastllm loads {supported}")
        return "fp8", 128
    if method != "compressed-tensors":
        raise ValueError(f"quantized checkpoint with quant_method {method!r} is not supported yet; fastllm loads "
                         f"{supported}")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):  # (a list crashed on .items(), naming nothing)
        raise ValueError(f"the checkpoint's compressed-tensors config_groups must map group names to their settings, "
                         f"got a {type(groups).__name__}; fastllm loads {supported}")
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise ValueError(f"config group {name!r} must be a mapping of its settings, got {group!r:.80}; fastllm "
                             f"loads {supported}")
        weights, inputs = group.get("weights") or {}, group.get("input_activations")
        # settings of another type than a mapping are refused as unsupported (they crashed on .get)
        if not isinstance(weights, dict) or not (weights.get("type") == "float" and weights.get("num_bits") == 8
                and weights.get("strategy") in ("channel", "tensor") and weights.get("symmetric", True)):
            raise ValueError(f"config group {name!r} quantizes weights as {weights}; fastllm loads {supported}")
        if inputs and not (isinstance(inputs, dict) and inputs.get("dynamic") and inputs.get("strategy") == "token"):
            # (said "static scales" of every refused setting: a dynamic per-tensor one too)
            raise ValueError(f"config group {name!r} quantizes activations as {inputs}; fastllm takes activation "
                             f"scales made per token at run time (dynamic, strategy 'token') and loads {supported}")
    if not qc.get("config_groups"):
        raise ValueError(f"the checkpoint's compressed-tensors config has no config_groups; fastllm loads {supported}")
    kv = qc.get("kv_cache_scheme")
    if kv and not (isinstance(kv, dict) and kv.get("type") == "float" and kv.get("num_bits") == 8
                   and kv.get("strategy") == "tensor" and not kv.get("dynamic")):
        raise ValueError(f"the checkpoint's KV cache scheme {kv!r} is not supported; fastllm loads an FP8 KV cache "
                         "with one static scale per layer for K and one for V")
    return "fp8", 128


def _as_dict(quantization_config) -> dict:
    """A config's `quantization_config` as a dict (transformers may hand over its own config object); ValueError for
    anything else (a string crashed on .to_dict(), naming nothing)."""
    if isinstance(quantization_config, dict):
        return quantization_config
    if callable(getattr(quantization_config, "to_dict", None)):
        return quantization_config.to_dict()
    raise ValueError(f"the checkpoint's quantization_config must be a mapping of its settings (quant_method, ...), "
                     f"got {quantization_config!r:.80}; fastllm loads {SUPPORTED}")


def _group_size_ok(group_size) -> bool:
    """An int of the supported group sizes (64.0 == 64 passed `in`, then QuantConfig refused it at optimize() time,
    as if the user had passed it)."""
    return isinstance(group_size, int) and not isinstance(group_size, bool) and group_size in (32, 64, 128)


def _gptq_group_size(qc: dict) -> int:
    settings = {"bits": qc.get("bits"), "group_size": qc.get("group_size"),
                "checkpoint_format": qc.get("checkpoint_format", "gptq")}
    if (settings["bits"] != 4 or not _group_size_ok(settings["group_size"])
            or settings["checkpoint_format"] != "gptq"):
        raise ValueError(f"GPTQ checkpoint with {settings} is not supported; fastllm loads {SUPPORTED}")
    return settings["group_size"]


def _awq_group_size(qc: dict) -> int:
    settings = {"bits": qc.get("bits", qc.get("w_bit")), "group_size": qc.get("group_size", qc.get("q_group_size")),
                "zero_point": qc.get("zero_point", True), "version": str(qc.get("version", "gemm")).lower()}
    if (settings["bits"] != 4 or not _group_size_ok(settings["group_size"]) or settings["zero_point"] is not True
            or settings["version"] != "gemm"):
        raise ValueError(f"AWQ checkpoint with {settings} is not supported; fastllm loads {SUPPORTED}")
    return settings["group_size"]


def _nibbles(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their 8 nibbles (nibble i = bits 4i..4i+3) spread along `dim` (word w -> 8w .. 8w + 7)."""
    words = words.to(torch.int64) & 0xFFFFFFFF  # int32 words as unsigned
    shifts = 4 * torch.arange(8, dtype=torch.int64)
    if dim == 0:
        return ((words[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, words.shape[1])
    return ((words[:, :, None] >> shifts[None, None, :]) & 15).reshape(words.shape[0], -1)


def _companion(tensors: dict, layer: str, suffix: str, layout: str) -> torch.Tensor:
    """`<layer><suffix>` (a quantized weight's scales, zero points, ...), or a ValueError naming the missing tensor
    and the layout that needs it (a bare KeyError named only the tensor)."""
    name = layer + suffix
    if name not in tensors:
        raise ValueError(f"{layer}: the checkpoint has no {name}, which {layout} stores beside each quantized weight; "
                         f"the checkpoint is incomplete or in another layout (fastllm loads {SUPPORTED})")
    return tensors[name]


def _check_shape(layer: str, what: str, tensor: torch.Tensor, expected: tuple[int, ...], layout: str,
                 weight: torch.Tensor) -> None:
    """ValueError unless `tensor` has the shape `layout` gives it beside its layer's quantized `weight` (a mismatch
    would fail inside a broadcast, naming no layer, or read its scales with the wrong group size)."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{layer}: {what} has shape {tuple(tensor.shape)}; {layout} gives it {tuple(expected)} "
                         f"beside the layer's quantized weight of shape {tuple(weight.shape)}")


def _check_finite(layer: str, what: str, tensor: torch.Tensor) -> None:
    """ValueError when a layer's scales hold NaN or infinity: every logit the layer feeds would be NaN."""
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{layer}: {what} holds NaN or infinite values; a quantized weight's scales must be finite "
                         "(the checkpoint is damaged)")


def _int4_tensors(codes_kn: torch.Tensor, scales_gn: torch.Tensor, zeros_gn: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Codes [K, N] (0..15), scales and zeros [K / g, N] -> fastllm's int4: (packed, scales) when every zero is 8
    (symmetric), else (packed, scales, zeros)."""
    codes = codes_kn.t().contiguous()  # [N, K]
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).contiguous()
    scales = scales_gn.float().t().contiguous()
    if bool((zeros_gn == 8).all()):
        return packed, scales
    return packed, scales, zeros_gn.float().t().contiguous()


def _from_awq(tensors: dict, layer: str, group_size: int) -> tuple[torch.Tensor, ...]:
    """An AWQ GEMM layer's (qweight, qzeros, scales) -> fastllm's int4 with zero points."""
    natural = torch.tensor([AWQ_ORDER.index(c) for c in range(8)])  # nibble holding each column of a block

    def columns(words):
        spread = _nibbles(words, 1)  # [rows, 8 * blocks], in nibble order
        blocks = spread.reshape(spread.shape[0], -1, 8)
        return blocks[:, :, natural].reshape(spread.shape[0], -1)

    layout = "AWQ's GEMM layout"
    qweight = tensors[layer + ".qweight"]
    k, n = qweight.shape[0], 8 * qweight.shape[1]
    scales, qzeros = (_companion(tensors, layer, suffix, layout) for suffix in (".scales", ".qzeros"))
    _check_groups(layer, k, group_size, layout)
    _check_shape(layer, "scales", scales, (k // group_size, n), layout, qweight)
    _check_shape(layer, "qzeros", qzeros, (k // group_size, n // 8), layout, qweight)
    _check_finite(layer, "scales", scales)
    return _int4_tensors(columns(qweight), scales, columns(qzeros))


def _from_gptq(tensors: dict, layer: str, group_size: int,
               act_order: bool = False) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """A GPTQ layer's (qweight, qzeros, scales[, g_idx]) -> (fastllm's int4: packed [N, K // 2], scales [N, K // g],
    and zeros like scales unless every zero is the symmetric 8; the input channels' order for act-order, else None).
    `act_order` (the config's desc_act): the layer must carry its g_idx."""
    layout = "GPTQ's layout"
    qweight = tensors[layer + ".qweight"]
    k, n = 8 * qweight.shape[0], qweight.shape[1]
    scales, qzeros = (_companion(tensors, layer, suffix, layout) for suffix in (".scales", ".qzeros"))
    _check_groups(layer, k, group_size, layout)
    _check_shape(layer, "scales", scales, (k // group_size, n), layout, qweight)
    _check_shape(layer, "qzeros", qzeros, (k // group_size, n // 8), layout, qweight)
    _check_finite(layer, "scales", scales)
    codes = _nibbles(qweight, 0)  # [K, N]: input channel 8r + i
    zeros = _nibbles(qzeros, 1) + 1  # [K / g, N]; the "gptq" format stores zero - 1
    # With desc_act the channels were quantized in an order only g_idx records: without it the layer loaded in the
    # natural order, its weights silently wrong
    g_idx = _companion(tensors, layer, ".g_idx", "GPTQ's layout with desc_act") if act_order else \
        tensors.get(layer + ".g_idx")
    order = None
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // group_size):
        order = _act_order(g_idx.long(), k, group_size, layer)
        codes = codes[order]  # group by group, as fastllm's int4 layout holds them
    return _int4_tensors(codes, scales, zeros), order


def _check_groups(layer: str, k: int, group_size: int, layout: str) -> None:
    """ValueError unless the config's group size cuts a layer's K input channels into whole groups."""
    if k % group_size:
        raise ValueError(f"{layer}: {k} input channels are not whole groups of the checkpoint's group_size "
                         f"{group_size} ({layout})")


def _act_order(g_idx: torch.Tensor, k: int, group_size: int, layer: str) -> torch.Tensor:
    """The order of input channels that makes act-order GPTQ's groups contiguous: the channels sorted by group (stably).
    GPTQ quantizes the channels in its own order and cuts that order into groups of `group_size`, so every group
    holds exactly `group_size` channels; anything else is not a GPTQ g_idx."""
    groups = k // group_size
    if g_idx.shape != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise ValueError(f"{layer}: g_idx must name one of the {groups} groups for each of the {k} input channels")
    order = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[order], torch.arange(k) // group_size):
        raise ValueError(f"{layer}: g_idx's groups must hold {group_size} input channels each (the group size)")
    return order


def _float_weight(int4: tuple[torch.Tensor, ...], order: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight in `dtype`, its input channels in the model's order (the quantized tensors may hold them
    in act-order)."""
    weight = dequantize_int4(*int4[:2], dtype, *int4[2:])
    if order is None:
        return weight
    natural = torch.empty_like(weight)
    natural[:, order] = weight
    return natural


def _in_module_layout(model: torch.nn.Module, layer: str, weight: torch.Tensor) -> torch.Tensor:
    """A GPTQ / AWQ layer's dequantized weight [N, K] as its module holds it. GPTQ and AWQ quantize GPT-2's Conv1D as
    the linear it is (AutoGPTQ packs `weight.t()`: in-features weight.shape[0], out-features weight.shape[1]), so
    their tensors are those of a Linear; the Conv1D holds [K, N]. By the module's type, not the shapes: a square
    layer (GPT-2's attn.c_proj) fits either way, and judged by its shape would load transposed, silently."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:  # no such module: load_state_dict names its weight as unexpected
        return weight
    return weight.t().contiguous() if is_conv1d(module) else weight


def _state_dict(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(os.path.join(path, name)))
    return tensors


def load_prequantized(path: str, dtype: torch.dtype = torch.bfloat16, device=None):
    """A Hugging Face causal LM from a quantized checkpoint folder (see the module docstring), ready for
    `fastllm.optimize(model)` or `fastllm.LLM(model)`, which use its quantized weights as they are.

    Raises:
        ValueError: the checkpoint's quantization is not one fastllm loads (the message says which it does).
    """
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(path)
    quantization_config = getattr(config, "quantization_config", None)
    if quantization_config is None:
        raise ValueError(f"{path} is not a quantized checkpoint (its config has no quantization_config)")
    scheme, group_size = checkpoint_scheme(quantization_config)
    qc = _as_dict(quantization_config)
    method, block = qc.get("quant_method"), tuple(qc.get("weight_block_size") or ())  # block: block-wise FP8
    del config.quantization_config
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _state_dict(path)
    prequantized = Prequantized(scheme, source=path, group_size=group_size)
    untiled: list[str] = []  # block-wise FP8 layers whose shape the blocks do not tile
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith((".weight_scale", ".weight_scale_inv", ".qzeros", ".scales", ".g_idx", ".k_scale",
                          ".v_scale")):
            continue
        if name.endswith(".qweight"):  # GPTQ or AWQ
            layer = name.removesuffix(".qweight")
            int4, order = (_from_awq(tensors, layer, group_size), None) if method == "awq" else \
                _from_gptq(tensors, layer, group_size, act_order=bool(qc.get("desc_act")))
            prequantized.layers[layer] = int4
            if order is not None:
                prequantized.input_orders[layer] = order
            state[layer + ".weight"] = _in_module_layout(model, layer, _float_weight(int4, order, dtype))
            continue
        if name.endswith(".weight") and tensor.dtype == FP8 and method == "fp8":  # block-wise
            layer = name.removesuffix(".weight")
            scale_inv = _block_scales(tensors, layer, tensor, block)
            state[name] = dequantize_blocks(tensor, scale_inv, dtype, block)
            if tensor.shape[0] % block[0] or tensor.shape[1] % block[1]:
                untiled.append(f"{layer} {tuple(tensor.shape)}")  # partial edge blocks: runs its dequantized weight
                prequantized.unquantized[layer] = (f"not quantized: blocks of {block[0]}x{block[1]} do not tile its "
                                                   f"weight of {tuple(tensor.shape)}; it runs its dequantized weight")
            else:
                prequantized.layers[layer] = (tensor.contiguous(), scale_inv)
            continue
        if name.endswith(".weight") and tensor.is_floating_point() and tensor.element_size() == 1 \
                and tensor.dtype != FP8:
            # Another float8 format (e5m2, ...): the config's "float, 8 bits" fits it too, but fastllm's FP8 is e4m3;
            # such weights loaded as the model's float weights, their raw codes unscaled (garbage, silently)
            raise ValueError(f"{name} is stored as {str(tensor.dtype).removeprefix('torch.')}; fastllm's FP8 "
                             f"layouts hold weights as float8_e4m3fn (fastllm loads {SUPPORTED})")
        if name.endswith(".weight") and tensor.dtype == FP8:
            layer = name.removesuffix(".weight")
            scale = _channel_scales(tensors, layer, tensor.shape[0])
            prequantized.layers[layer] = (tensor.contiguous(), scale)
            tensor = tensor.float() * scale[:, None]
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor  # integer buffers keep their type
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not _tied(model, m)]
    if missing or unexpected:
        raise ValueError(f"{path}: the checkpoint does not match {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    prequantized.kv_scales = _kv_scales(tensors, qc)
    forms = {len(t) for t in prequantized.layers.values()}
    if scheme == "int4" and len(forms) > 1:  # int4 layers with and without zero points: run them all with zeros
        prequantized.layers = {name: t if len(t) == 3 else (*t, torch.full_like(t[1], 8.0))
                               for name, t in prequantized.layers.items()}
    prequantized.zero_point = scheme == "int4" and 3 in forms
    model._fastllm_prequantized = prequantized
    model.eval()
    if method == "fp8":
        skipped = f"; layers whose shape the {block[0]}x{block[1]} blocks do not tile run their dequantized weights " \
                  f"in the model's dtype: {', '.join(untiled)}" if untiled else ""
        warnings.warn(f"fastllm: {BLOCK_FP8_WARNING}{skipped}", RuntimeWarning, stacklevel=2)
    if device is not None:  # the quantized tensors go with the model: the pass then uses them where they are
        prequantized.layers = {name: tuple(t.to(device) for t in tensors)
                               for name, tensors in prequantized.layers.items()}
        prequantized.input_orders = {name: order.to(device) for name, order in prequantized.input_orders.items()}
        model = model.to(device)
    return model


def _channel_scales(tensors: dict, layer: str, n: int) -> torch.Tensor:
    """A compressed-tensors FP8 layer's `weight_scale` ([N, 1] or [N] per channel, [1] per tensor) as [N] fp32."""
    layout = "compressed-tensors' FP8 layout"
    scale = _companion(tensors, layer, ".weight_scale", layout).float().reshape(-1)
    if scale.numel() not in (1, n):
        raise ValueError(f"{layer}: weight_scale has shape {tuple(tensors[layer + '.weight_scale'].shape)}; "
                         f"{layout} gives one scale per output channel ({n}, 1) or one per tensor (1,)")
    _check_finite(layer, "weight_scale", scale)
    return scale.expand(n).contiguous()


def _block_scales(tensors: dict, layer: str, weight: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """A block-wise FP8 layer's `weight_scale_inv` [ceil(N / bn), ceil(K / bk)] in fp32."""
    layout = "transformers' block-wise FP8 layout"
    scale_inv = _companion(tensors, layer, ".weight_scale_inv", layout)
    _check_shape(layer, "weight_scale_inv", scale_inv, tuple(-(-d // b) for d, b in zip(weight.shape, block)),
                 f"{layout} with blocks of {block[0]}x{block[1]}", weight)
    _check_finite(layer, "weight_scale_inv", scale_inv)
    return scale_inv.float().contiguous()


def _kv_scales(tensors: dict[str, torch.Tensor], qc: dict) -> list[tuple[float, float]] | None:
    """compressed-tensors' FP8 KV cache scales (`<attention>.k_scale`, `.v_scale`, one number each), in the order
    of the attention modules' names' layer index; None without a kv_cache_scheme."""
    if qc.get("quant_method") != "compressed-tensors" or not qc.get("kv_cache_scheme"):
        return None
    prefixes = sorted({n.removesuffix(".k_scale") for n in tensors if n.endswith(".k_scale")},
                      key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    scales = []
    for prefix in prefixes:
        pair = tuple(_kv_scale(tensors, prefix, kv) for kv in "kv")
        if not all(math.isfinite(s) and s > 0 for s in pair):
            raise ValueError(f"{prefix}: KV cache scales must be finite and positive, got {pair}")
        scales.append(pair)
    if not scales:
        raise ValueError("the checkpoint declares a kv_cache_scheme but holds no k_scale / v_scale tensors")
    return scales


def _kv_scale(tensors: dict[str, torch.Tensor], prefix: str, kv: str) -> float:
    """One layer's k_scale or v_scale, one number (a tensor of several, one per head, was read as its first number,
    the others dropped silently)."""
    scale = _companion(tensors, prefix, f".{kv}_scale", "compressed-tensors' kv_cache_scheme")
    if scale.numel() != 1:
        raise ValueError(f"{prefix}: {kv}_scale has {scale.numel()} numbers; fastllm loads an FP8 KV cache with one "
                         "static scale per layer for K and one for V (kv_cache_scheme strategy 'tensor')")
    return float(scale.float().reshape(-1)[0])


def _tied(model, name: str) -> bool:
    """Whether a parameter missing from the checkpoint is the output embedding tied to the input one."""
    head = model.get_output_embeddings()
    return getattr(model.config, "tie_word_embeddings", False) and head is not None and name.startswith(
        next(n for n, m in model.named_modules() if m is head))
