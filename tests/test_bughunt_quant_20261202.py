"""Defects found by a bug hunt over quantization on the CPU (2026-12-02), each as a test: quantized checkpoints whose
layout is malformed or other than their config says are refused naming what is wrong (they loaded and ran garbage,
or crashed with an AttributeError); kv_calibration_ids takes numpy arrays and tensors of token ids; models whose
linears are not F.linear calls (GPT-2's Conv1D, Falcon's `x @ W.T`) are quantized, not silently left in their dtype;
a block-wise FP8 layer the blocks do not tile is listed by explain(); an LM head tied to the embedding runs
quantized in Hugging Face's forward too."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_quant_checkpoints import (
    _float_model,
    _with_kv_scales,
    _write_block_fp8_checkpoint,
    _write_fp8_checkpoint,
    _write_gptq_checkpoint,
)

import fastllm
from fastllm import QuantConfig
from fastllm.quant import load_prequantized
from fastllm.quant.checkpoints import checkpoint_scheme

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 17, 19]])


def _edit(path, change) -> None:
    state = load_file(str(path / "model.safetensors"))
    change(state)
    save_file(state, str(path / "model.safetensors"))


def _edit_config(path, change) -> None:
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def _sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).mean() / (reference - approx).pow(2).mean()))


# -- quantized checkpoints -------------------------------------------------------------------------------------------

def test_fp8_weights_in_another_float8_format_are_refused(tmp_path):
    """compressed-tensors' config says "float, 8 bits", which fits e5m2 too. Weights stored as float8_e5m2 loaded
    as the model's float weights, their raw codes unscaled (a down_proj of magnitude 448 instead of ~0.05), no layer
    quantized, and the model ran garbage without a word."""
    _write_fp8_checkpoint(_float_model(tmp_path), tmp_path)
    _edit(tmp_path, lambda state: state.update({name: t.float().to(torch.float8_e5m2) for name, t in state.items()
                                                if t.dtype == torch.float8_e4m3fn}))
    with pytest.raises(ValueError, match=r"model\.layers\.\d\.\w+\.\w+\.weight is stored as float8_e5m2; "
                                         r"fastllm's FP8 layouts hold weights as float8_e4m3fn"):
        load_prequantized(str(tmp_path), dtype=torch.float32)


def test_act_order_gptq_without_g_idx_is_refused(tmp_path):
    """desc_act: true says each layer's input channels were quantized in an order of their own, which only g_idx
    records. Without g_idx the layers loaded in the natural order (weights off by up to a whole quantization step,
    silently)."""
    _write_gptq_checkpoint(_float_model(tmp_path), tmp_path, act_order=True)
    _edit(tmp_path, lambda state: [state.pop(name) for name in list(state) if name.endswith(".g_idx")])
    with pytest.raises(ValueError, match=r"(model\.layers\.\d\.\w+\.\w+): the checkpoint has no \1\.g_idx, "
                                         r"which GPTQ's layout with desc_act stores"):
        load_prequantized(str(tmp_path), dtype=torch.float32)


def test_a_kv_scale_of_more_than_one_number_is_refused(tmp_path):
    """kv_cache_scheme's strategy "tensor" is one scale per layer; a k_scale with one per head ([0.5, 4.0]) loaded as
    its first number, 4.0 dropped without a word."""
    _write_fp8_checkpoint(_float_model(tmp_path), tmp_path)
    _with_kv_scales(tmp_path, 0.5, 0.5)
    _edit(tmp_path, lambda state: state.update({"model.layers.0.self_attn.k_scale": torch.tensor([0.5, 4.0])}))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn: k_scale has 2 numbers; .* one static scale "
                                         r"per layer"):
        load_prequantized(str(tmp_path), dtype=torch.float32)


@pytest.mark.parametrize("config, message", [
    ("fp8", r"quantization_config must be a mapping .* got 'fp8'"),
    ({"quant_method": "compressed-tensors", "config_groups": [{"weights": {}}]},
     r"config_groups must map group names to their settings, got a list"),
    ({"quant_method": "compressed-tensors",
      "config_groups": {"group_0": {"weights": {"type": "float", "num_bits": 8, "strategy": "channel"},
                                    "input_activations": True}}},
     r"config group 'group_0' quantizes activations as True"),
    ({"quant_method": "compressed-tensors", "config_groups": {"group_0": ["weights"]}},
     r"config group 'group_0' must be a mapping of its settings, got \['weights'\]"),
    ({"quant_method": "compressed-tensors",
      "config_groups": {"group_0": {"weights": {"type": "float", "num_bits": 8, "strategy": "channel"}}},
      "kv_cache_scheme": "fp8"}, r"the checkpoint's KV cache scheme 'fp8' is not supported"),
])
def test_malformed_quantization_configs_are_refused_naming_what_is_wrong(config, message):
    # each was an AttributeError ("'list' object has no attribute 'items'", "'bool' object has no attribute 'get'",
    # "'str' object has no attribute 'to_dict'") naming no setting
    with pytest.raises(ValueError, match=message):
        checkpoint_scheme(config)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_checkpoint_group_size_that_is_no_int_is_refused_at_load(method):
    """group_size 64.0 passed `in (32, 64, 128)`: the checkpoint loaded, then optimize() refused it with
    "group_size must be one of (32, 64, 128) (an int), got 64.0", as if the user had passed a bad QuantConfig."""
    config = {"quant_method": method, "bits": 4, "group_size": 64.0, "version": "gemm", "zero_point": True}
    with pytest.raises(ValueError, match=f"{method.upper()} checkpoint with .*'group_size': 64.0.* is not supported"):
        checkpoint_scheme(config)


def test_a_block_fp8_layer_the_blocks_do_not_tile_is_listed_by_explain(tmp_path):
    """Blocks of 96x80 tile none of the weights: every layer ran its dequantized weight, and explain() listed none of
    them (quantized_layers was {}), where a merged layer with such a part was listed as "not quantized"."""
    _write_block_fp8_checkpoint(_float_model(tmp_path), tmp_path, block=(96, 80))
    with pytest.warns(RuntimeWarning, match="do not tile"):
        model = fastllm.optimize(load_prequantized(str(tmp_path), dtype=torch.float32))
    layers = fastllm.explain(model).graph.quantized_layers
    assert layers["model.layers.0.mlp.down_proj"] == ("not quantized: blocks of 96x80 do not tile its weight of "
                                                      "(256, 512); it runs its dequantized weight")
    assert len(layers) == 8 and all(v.startswith("not quantized") for v in layers.values())


# -- QuantConfig -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ids", [np.arange(3, 13), torch.arange(3, 13), [np.int64(3), *range(4, 13)]])
def test_kv_calibration_ids_take_numpy_arrays_and_tensors(ids):
    # a tokenizer's return_tensors="pt" / "np" ids were refused as "not a non-empty sequence of token ids"
    config = QuantConfig(weights=None, kv_cache="fp8", kv_scales="auto", kv_calibration_ids=ids)
    assert config.kv_calibration_ids == tuple(range(3, 13))
    assert all(type(t) is int for t in config.kv_calibration_ids)
    for bad in (torch.arange(6).reshape(2, 3), np.array([1.5, 2.0]), torch.tensor([-1, 2])):
        with pytest.raises(ValueError, match="kv_calibration_ids must be a non-empty sequence of token ids"):
            QuantConfig(weights=None, kv_cache="fp8", kv_scales="auto", kv_calibration_ids=bad)


# -- models whose linears are not F.linear calls ---------------------------------------------------------------------

def _family(name, path):
    from _models import build

    return build(name, path)


@pytest.mark.parametrize("family, scheme", [("gpt2", "int8"), ("gpt2", QuantConfig("int4", group_size=32)),
                                            ("falcon_rw", "fp8"), ("falcon_rw", "int8")])
def test_conv1d_and_matmul_linears_are_quantized(tmp_path, family, scheme):
    """GPT-2's Conv1D (addmm with a [K, N] weight) and Falcon's FalconLinear (`x @ W.T`) are no F.linear calls: the
    quantize pass took none of them, so quantization= left every layer of these models in their dtype, silently
    (explain() listed nothing quantized, no float weight was let go)."""
    from _models import optimize

    reference = _family(family, tmp_path)
    with torch.no_grad():
        expected = reference(IDS).logits
    model = optimize(_family(family, tmp_path), quantization=scheme, graph_cache=False)
    label = QuantConfig(scheme).label if isinstance(scheme, str) else scheme.label
    layers = fastllm.explain(model).graph.quantized_layers
    assert len(layers) == 8 and set(layers.values()) == {label}, layers  # 2 layers x 4 linears; not the LM head
    with torch.no_grad():
        got = model(IDS).logits
        eager = model(IDS, use_cache=True).logits  # Hugging Face's forward, on the modules now run quantized
    # Quantized: near the float model, but not it. Here 38-60 dB (int8 on GPT-2 the most: its biases carry much of the
    # logits); the float model optimized without quantization: inf (GPT-2) and 136 dB (Falcon-RW), fp32 rounding.
    assert 12 < _sqnr(expected, got) < 80
    torch.testing.assert_close(eager, got, rtol=1e-5, atol=1e-5)
    assert model._fastllm_state.float_bytes_released > 0
    names = [part for layer in layers for part in layer.split("+")]
    assert all(model.get_submodule(name).weight.numel() == 0 for name in names)


def test_a_conv1d_excluded_stays_an_exact_addmm_beside_quantized_ones(tmp_path):
    """The Conv1Ds now quantized, an excluded one keeps its addmm and float weight (its math unchanged)."""
    from _models import optimize

    with warnings.catch_warnings():  # the excluded layers are layers of this model: no "names none" warning
        warnings.filterwarnings("error", message=".*exclude entries")
        model = optimize(_family("gpt2", tmp_path), graph_cache=False,
                         quantization=QuantConfig("int8", exclude=("lm_head", "mlp.c_fc")))
    report = fastllm.explain(model)
    assert len(report.graph.quantized_layers) == 6 and not any("c_fc" in n for n in report.graph.quantized_layers)
    assert report.unfused_ops.get("addmm") == 2  # the two c_fc layers, as the model wrote them
    assert model.transformer.h[0].mlp.c_fc.weight.numel() > 0
    assert model.transformer.h[0].mlp.c_proj.weight.numel() == 0


def test_a_falcon_gptq_checkpoint_runs_its_quantized_layers(tmp_path):
    """A GPTQ Falcon loaded (its layers dequantized for Hugging Face's forward) and then ran those float weights:
    the quantize pass never met its `x @ W.T` linears, and explain() listed no layer."""
    reference = _family("falcon_rw", tmp_path)
    _write_gptq_checkpoint(reference, tmp_path, group_size=32)
    model = load_prequantized(str(tmp_path), dtype=torch.float32)
    with torch.no_grad():
        hf_logits = model(IDS).logits  # HF's forward on the dequantized weights
    fastllm.optimize(model, graph_cache=False)
    layers = fastllm.explain(model).graph.quantized_layers
    assert len(layers) == 8 and set(layers.values()) == {"int4-g32"}
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, hf_logits, rtol=1e-4, atol=1e-4)


# -- an LM head tied to the embedding --------------------------------------------------------------------------------

def test_a_tied_lm_head_runs_quantized_in_hfs_forward_too(tmp_path):
    """exclude=() quantizes the LM head, which Qwen2 ties to its embedding: the head kept its float weight (the
    embedding reads it) and also its float forward, so Hugging Face's forward (labels, past_key_values, use_cache)
    gave logits ~40 dB away from the compiled step's, where every other quantized module matched it."""
    from _models import optimize

    model = optimize(_family("qwen2", tmp_path), graph_cache=False, quantization=QuantConfig("int8", exclude=()))
    assert fastllm.explain(model).graph.quantized_layers["model.embed_tokens+lm_head"] == "int8"
    with torch.no_grad():
        compiled = model(IDS).logits
        eager = model(IDS, use_cache=True).logits
    torch.testing.assert_close(eager, compiled, rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight.numel() > 0 and model.model.embed_tokens.weight.numel() > 0  # the embedding's
