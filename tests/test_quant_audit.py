"""Quantization options and quantized checkpoints a user gets wrong: each is refused (or warned about) naming what
was wrong and what is allowed, instead of a crash deep in the quantize pass, a bare KeyError, or a model that loads
and then runs the wrong math."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file
from test_quant_checkpoints import (
    _float_model,
    _with_kv_scales,
    _write_awq_checkpoint,
    _write_block_fp8_checkpoint,
    _write_fp8_checkpoint,
    _write_gptq_checkpoint,
)

import fastllm
from fastllm import QuantConfig
from fastllm.quant import load_prequantized

LAYER = "model.layers.0.mlp.down_proj"  # [256 out, 512 in] in _float_model


# -- QuantConfig ---------------------------------------------------------------------------------------------------

def test_group_size_must_be_an_int_of_the_allowed_sizes():
    # 64.0 == 64 passed `in (32, 64, 128)`, then the quantize pass crashed in a reshape ("tuple of ints")
    for bad in (64.0, 64.5, "64", True, 16, None):
        with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128\) \(an int\), got"):
            QuantConfig("int4", group_size=bad)
    config = QuantConfig("int4", group_size=np.int64(64))  # any integer type, kept as a plain int
    assert type(config.group_size) is int and config.label == "int4-g64"


def test_exclude_must_be_a_sequence_of_module_names():
    # None and non-sequences failed with "'NoneType' object is not iterable", naming no option
    for bad in (None, 5, "lm_head", ("lm_head", ""), ("lm_head", 3)):
        with pytest.raises(ValueError, match=r"exclude must be a tuple of module names \(\(\) quantizes every"):
            QuantConfig("int8", exclude=bad)
    # a generator is read once: its names are kept, not used up by the check
    assert QuantConfig("int8", exclude=(name for name in ["lm_head", "mlp.down_proj"])).exclude == \
        ("lm_head", "mlp.down_proj")
    assert QuantConfig("int8", exclude=["lm_head"]).exclude == ("lm_head",)


def _small_llama(path):
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=96, max_position_embeddings=64)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return T.AutoModelForCausalLM.from_pretrained(path).eval()


def test_an_exclude_entry_that_names_no_layer_is_warned_about(tmp_path):
    """A typo in `exclude` used to exclude nothing, silently: the layer meant ran quantized."""
    with pytest.warns(RuntimeWarning, match=r"exclude entries \['mlp.down_prj'\] name none of 8 linear layers .* "
                                            r"\(e.g. 'model.layers.0.mlp.down_proj' or 'mlp.down_proj'\)"):
        model = fastllm.optimize(_small_llama(tmp_path), graph_cache=False,
                                 quantization=QuantConfig("int8", exclude=("lm_head", "mlp.down_prj")))
    layers = fastllm.explain(model).graph.quantized_layers
    assert layers["model.layers.0.mlp.down_proj"] == "int8"  # what the warning says: it was not excluded
    with warnings.catch_warnings():  # names that match warn of nothing, the default "lm_head" among them
        warnings.filterwarnings("error", message=".*exclude entries")
        fastllm.optimize(_small_llama(tmp_path / "again"), graph_cache=False,
                         quantization=QuantConfig("int8", exclude=("lm_head", "mlp.down_proj")))


# -- quantized checkpoints -------------------------------------------------------------------------------------------

def _edit(path, change) -> None:
    """Apply `change` to the checkpoint's tensors (a dict) and write them back."""
    state = load_file(str(path / "model.safetensors"))
    change(state)
    save_file(state, str(path / "model.safetensors"))


WRITERS = {"fp8": _write_fp8_checkpoint, "gptq": _write_gptq_checkpoint, "awq": _write_awq_checkpoint,
           "block_fp8": _write_block_fp8_checkpoint}


def _checkpoint(tmp_path, layout: str):
    WRITERS[layout](_float_model(tmp_path), tmp_path)
    return tmp_path


@pytest.mark.parametrize("layout, suffix, name", [
    ("fp8", ".weight_scale", "compressed-tensors' FP8 layout"),
    ("gptq", ".scales", "GPTQ's layout"),
    ("gptq", ".qzeros", "GPTQ's layout"),
    ("awq", ".qzeros", "AWQ's GEMM layout"),
    ("block_fp8", ".weight_scale_inv", "transformers' block-wise FP8 layout"),
])
def test_a_missing_scale_or_zero_point_tensor_names_it_and_the_layout(tmp_path, layout, suffix, name):
    # was a bare KeyError naming only the tensor
    path = _checkpoint(tmp_path, layout)
    _edit(path, lambda state: state.pop(LAYER + suffix))
    with pytest.raises(ValueError, match=rf"{LAYER}: the checkpoint has no {LAYER}\{suffix}, which {name} stores "
                                         r"beside each quantized weight; .*fastllm loads"):
        load_prequantized(str(path), dtype=torch.float32)


def test_a_missing_kv_cache_scale_is_named(tmp_path):
    path = _checkpoint(tmp_path, "fp8")
    _with_kv_scales(path, 0.5, 0.5)
    _edit(path, lambda state: state.pop("model.layers.0.self_attn.v_scale"))
    with pytest.raises(ValueError, match=r"the checkpoint has no model.layers.0.self_attn.v_scale, which "
                                         r"compressed-tensors' kv_cache_scheme stores"):
        load_prequantized(str(path), dtype=torch.float32)


def test_gptq_scales_of_another_group_size_than_the_config_are_refused(tmp_path):
    """The config says groups of 64 (8 groups over 512 inputs), the file holds 4 groups: it used to load and run
    groups of 128 while explain() listed the layer as "int4-g64"."""
    path = _checkpoint(tmp_path, "gptq")

    def halve_groups(state):
        state[LAYER + ".scales"] = state[LAYER + ".scales"][::2].contiguous()
        state[LAYER + ".qzeros"] = state[LAYER + ".qzeros"][::2].contiguous()

    _edit(path, halve_groups)
    with pytest.raises(ValueError, match=rf"{LAYER}: scales has shape \(4, 256\); GPTQ's layout gives it \(8, 256\) "
                                         r"beside the layer's quantized weight of shape \(64, 256\)"):
        load_prequantized(str(path), dtype=torch.float32)


@pytest.mark.parametrize("layout, suffix, keep, message", [
    ("gptq", ".qweight", lambda t: t[:, :128], r"scales has shape \(8, 256\); GPTQ's layout gives it \(8, 128\)"),
    ("awq", ".qzeros", lambda t: t[:, :16], r"qzeros has shape \(16, 16\); AWQ's GEMM layout gives it \(16, 32\)"),
    ("fp8", ".weight_scale", lambda t: t[:10], r"weight_scale has shape \(10, 1\); compressed-tensors' FP8 layout "
                                               r"gives one scale per output channel \(256, 1\) or one per tensor"),
    ("block_fp8", ".weight_scale_inv", lambda t: t[:1],
     r"weight_scale_inv has shape \(1, 4\); transformers' block-wise FP8 layout with blocks of 128x128 gives it "
     r"\(2, 4\)"),
])
def test_tensors_of_mismatched_shapes_are_refused_naming_the_layer(tmp_path, layout, suffix, keep, message):
    # were a RuntimeError from a broadcast ("The size of tensor a (256) must match ..."), naming no layer
    path = _checkpoint(tmp_path, layout)
    _edit(path, lambda state: state.__setitem__(LAYER + suffix, keep(state[LAYER + suffix]).contiguous()))
    with pytest.raises(ValueError, match=f"{LAYER}: {message}"):
        load_prequantized(str(path), dtype=torch.float32)


@pytest.mark.parametrize("layout, suffix", [("fp8", ".weight_scale"), ("gptq", ".scales"), ("awq", ".scales"),
                                            ("block_fp8", ".weight_scale_inv")])
def test_non_finite_weight_scales_are_refused(tmp_path, layout, suffix):
    # a NaN scale loaded, and every logit came out NaN
    path = _checkpoint(tmp_path, layout)

    def poison(state):
        scales = state[LAYER + suffix]
        scales.view(-1)[0] = float("nan") if layout != "awq" else float("inf")

    _edit(path, poison)
    name = suffix.lstrip(".")
    with pytest.raises(ValueError, match=rf"{LAYER}: {name} holds NaN or infinite values"):
        load_prequantized(str(path), dtype=torch.float32)


@pytest.mark.parametrize("again", [None, "int8"])
def test_a_quantized_model_released_is_refused_by_a_second_optimize(tmp_path, again):
    """Its float weights were freed (quant/resident.py): the second capture failed on the quantized forwards and the
    model silently ran Hugging Face's path (a misleading 'could not be captured' warning). Now a clear error; the
    released model itself still generates, quantized."""
    model = _small_llama(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    fastllm.optimize(model, graph_cache=False, quantization="int8")
    expected = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    fastllm.release(model)
    with pytest.raises(ValueError, match=r"quantized by an earlier optimize\(\) and released: .* reload the model"):
        fastllm.optimize(model, graph_cache=False, quantization=again)
    assert not hasattr(model, "_fastllm_state")  # nothing attached
    torch.testing.assert_close(model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0), expected)
