"""Quantized checkpoints loaded as they are: compressed-tensors' FP8 layout (per channel, per tensor), written here
from a tiny random Llama, loaded through `fastllm.quant.load_prequantized` and `fastllm.LLM(path)`."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from safetensors.torch import save_file

import fastllm
from fastllm.passes import quantize as quantize_pass
from fastllm.quant import fp8, load_prequantized
from fastllm.quant.checkpoints import checkpoint_scheme

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 17, 19]])


def _float_model(path):
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=320, max_position_embeddings=256)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    return model


def _compressed_tensors_config(strategy: str, activations: dict | None) -> dict:
    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": strategy,
                                                "symmetric": True, "dynamic": False}}
    if activations is not None:
        group["input_activations"] = activations
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": group},
            "ignore": ["lm_head"], "quantization_status": "compressed"}


def _write_fp8_checkpoint(model, path, strategy="channel",
                          activations=({"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True})):
    """compressed-tensors' layout: `<layer>.weight` float8 e4m3, `<layer>.weight_scale` [N, 1] (channel) or [1]
    (tensor); every Linear but lm_head. Returns {layer: (qweight, scale [N])} as written."""
    state = {name: t.clone() for name, t in model.state_dict().items()}
    written = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        w = module.weight.detach()
        if strategy == "channel":
            q, scale = fp8.quantize_weight(w)
            state[f"{name}.weight_scale"] = scale[:, None].clone()
        else:
            scale = (w.abs().max() / fp8.FP8_MAX).reshape(1).float()
            q = (w / scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8)
            state[f"{name}.weight_scale"] = scale.clone()
            scale = scale.expand(w.shape[0])
        state[f"{name}.weight"] = q
        written[name] = (q, scale)
    save_file(state, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = _compressed_tensors_config(strategy, activations)
    (path / "config.json").write_text(json.dumps(config))
    return written


@pytest.fixture
def no_requantizing(monkeypatch):
    def refuse(*args):
        raise AssertionError("a pre-quantized checkpoint must not be quantized again")

    monkeypatch.setattr(quantize_pass, "quantized_tensors", refuse)


def test_per_channel_checkpoint_equals_our_own_fp8_of_the_same_weights(tmp_path, monkeypatch):
    original = _float_model(tmp_path)
    _write_fp8_checkpoint(original, tmp_path, "channel")
    ours = fastllm.optimize(_float_model(tmp_path / "again"), quantization="fp8")  # same seed: same float weights
    with torch.no_grad():
        expected = ours(IDS).logits
    monkeypatch.setattr(quantize_pass, "quantized_tensors", lambda *a: pytest.fail("quantized again"))
    loaded = fastllm.optimize(load_prequantized(str(tmp_path), dtype=torch.float32))
    layers = fastllm.explain(loaded).graph.quantized_layers
    assert len(layers) == 8 and set(layers.values()) == {"fp8"} and not any("lm_head" in n for n in layers)
    with torch.no_grad():
        got = loaded(IDS).logits
    # The checkpoint holds exactly what fastllm's own quantization makes of these weights (merged QKV / gate-up
    # parts concatenated from the file): the same logits, bit for bit (fp32 on the CPU).
    assert torch.equal(got, expected)


def test_per_tensor_checkpoint_runs_its_own_scales(tmp_path, no_requantizing):
    original = _float_model(tmp_path)
    written = _write_fp8_checkpoint(original, tmp_path, "tensor", activations=None)
    model = load_prequantized(str(tmp_path), dtype=torch.float32)
    (q, scale) = model._fastllm_prequantized.layers["model.layers.0.mlp.down_proj"]
    assert torch.equal(q.view(torch.uint8), written["model.layers.0.mlp.down_proj"][0].view(torch.uint8))
    assert torch.equal(scale, written["model.layers.0.mlp.down_proj"][1])  # one scale, for every channel
    # Hugging Face's forward runs on the dequantized weights
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, q.float() * scale[:, None])
    fastllm.optimize(model)
    with torch.no_grad():
        expected = original(IDS).logits
        got = model(IDS).logits
    assert float(10 * torch.log10(expected.pow(2).mean() / (expected - got).pow(2).mean())) > 15


def test_llm_loads_a_quantized_folder(tmp_path, no_requantizing):
    original = _float_model(tmp_path)
    _write_fp8_checkpoint(original, tmp_path)
    params = fastllm.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    with fastllm.LLM(str(tmp_path)) as llm:
        out = llm.generate([IDS[0].tolist()], params, use_tqdm=False)[0].outputs[0].token_ids
        assert set(fastllm.explain(llm.model).graph.quantized_layers.values()) == {"fp8"}
    assert len(out) == 5


def test_unsupported_layouts_say_what_is_supported(tmp_path):
    with pytest.raises(ValueError, match="quant_method 'gptq' is not supported yet; fastllm loads compressed-tensors"):
        checkpoint_scheme({"quant_method": "gptq", "bits": 4})
    static = _compressed_tensors_config("channel", {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                    "dynamic": False})
    with pytest.raises(ValueError, match="static scales"):
        checkpoint_scheme(static)
    int4 = _compressed_tensors_config("group", None)
    int4["config_groups"]["group_0"]["weights"].update(type="int", num_bits=4)
    with pytest.raises(ValueError, match="quantizes weights as"):
        checkpoint_scheme(int4)
    _float_model(tmp_path)
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        load_prequantized(str(tmp_path))


def test_another_scheme_than_the_checkpoints_is_refused(tmp_path):
    _write_fp8_checkpoint(_float_model(tmp_path), tmp_path)
    model = load_prequantized(str(tmp_path), dtype=torch.float32)
    with pytest.raises(ValueError, match="cannot re-quantize it"):
        fastllm.optimize(model, quantization="int4")
