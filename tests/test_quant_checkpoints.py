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
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes' is not supported yet; fastllm loads"):
        checkpoint_scheme({"quant_method": "bitsandbytes", "load_in_4bit": True})
    for setting in ({"bits": 8}, {"group_size": -1}, {"checkpoint_format": "marlin"}):
        with pytest.raises(ValueError, match="GPTQ checkpoint with .* is not supported; fastllm loads"):
            checkpoint_scheme({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, **setting})
    for setting in ({"version": "gemv"}, {"zero_point": False}, {"bits": 3}):
        with pytest.raises(ValueError, match="AWQ checkpoint with .* is not supported; fastllm loads"):
            checkpoint_scheme({"quant_method": "awq", "bits": 4, "group_size": 128, **setting})
    assert checkpoint_scheme({"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": False,
                              "desc_act": False}) == ("int4", 64)
    assert checkpoint_scheme({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "GEMM",
                              "zero_point": True}) == ("int4", 32)
    static = _compressed_tensors_config("channel", {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                    "dynamic": False})
    with pytest.raises(ValueError, match="activations as .*'dynamic': False.*; fastllm takes activation scales made "
                                         "per token at run time"):
        checkpoint_scheme(static)
    dynamic_tensor = _compressed_tensors_config("channel", {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                            "dynamic": True})
    with pytest.raises(ValueError, match="'strategy': 'tensor'.*made per token at run time \\(dynamic, strategy "
                                         "'token'\\)"):
        checkpoint_scheme(dynamic_tensor)
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


def test_an_exclude_the_checkpoint_cannot_honour_is_refused(tmp_path):
    """A checkpoint's quantized layers have no float weights: an `exclude` naming some was silently dropped (the
    layers ran quantized). The default exclude (the LM head, stored in float) and () are accepted."""
    _write_fp8_checkpoint(_float_model(tmp_path), tmp_path)
    model = load_prequantized(str(tmp_path), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"exclude=\('lm_head', 'mlp.down_proj'\) cannot keep any .* leave exclude"):
        fastllm.optimize(model, quantization=fastllm.QuantConfig("fp8", exclude=("lm_head", "mlp.down_proj")))
    fastllm.optimize(model, quantization=fastllm.QuantConfig("fp8"))
    assert fastllm.explain(model).status == "optimized"


# --- GPTQ ---------------------------------------------------------------------------------------------------------

def _act_order(k: int, seed: int = 0) -> torch.Tensor:
    """The order GPTQ's act-order would quantize K input channels in (it sorts them by the layer input's Hessian
    diagonal, so layers reading the same input share it): here a fixed random one per (K, seed)."""
    return torch.randperm(k, generator=torch.Generator().manual_seed(k * 31 + seed))


def _write_gptq_checkpoint(model, path, group_size=64, zero=7, act_order=False, seeds=None):
    """GPTQ's layout ("gptq" format, 4-bit, symmetric): per Linear but lm_head, `qweight` int32 [K/8, N] (input
    channel 8r+i in nibble i of row r), `qzeros` int32 [K/g, N/8] (zero - 1 = 7 in every nibble), `scales` fp16
    [K/g, N], `g_idx` [K]. Written from fastllm's own int4 of the weights with fp16 scales; returns the dequantized
    weights the file holds (the GPTQ formula (q - (z + 1)) * s[g_idx], computed here from the file's tensors).
    `act_order`: each layer's input channels are quantized in `_act_order`'s order (`seeds`: layer name -> seed, 0
    by default), groups cut along it, and the file keeps the natural channel order with g_idx naming the groups."""
    from fastllm.quant.int_weight import quantize_int4, unpack_int4

    state = {name: t.clone() for name, t in model.state_dict().items()}
    dequantized = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        w = module.weight.detach()
        n, k = w.shape
        order = _act_order(k, (seeds or {}).get(name, 0)) if act_order else torch.arange(k)
        packed, scales = quantize_int4(w[:, order], group_size)  # groups cut along the quantization order
        scales16 = scales.half()
        q = torch.empty(k, n, dtype=torch.long)
        q[order] = (unpack_int4(packed).long() + 8).t()  # [K, N] in 0..15, natural channel order
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = torch.arange(k, dtype=torch.int32) // group_size
        words = (q.reshape(k // 8, 8, n) << (4 * torch.arange(8))[None, :, None]).sum(1)
        qzeros = torch.full((k // group_size, n // 8), zero * 0x11111111, dtype=torch.int64)
        del state[f"{name}.weight"]
        state.update({f"{name}.qweight": words.to(torch.int32), f"{name}.qzeros": qzeros.to(torch.int32),
                      f"{name}.scales": scales16.t().contiguous(), f"{name}.g_idx": g_idx})
        z = zero + 1
        dequantized[name] = ((q - z).float() * scales16.t().float()[g_idx.long()]).t()
    save_file(state, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": True,
                                     "desc_act": act_order, "checkpoint_format": "gptq"}
    (path / "config.json").write_text(json.dumps(config))
    return dequantized


def test_gptq_checkpoint_loads_as_int4_without_requantizing(tmp_path, no_requantizing):
    original = _float_model(tmp_path)
    dequantized = _write_gptq_checkpoint(original, tmp_path, group_size=64)
    model = load_prequantized(str(tmp_path), dtype=torch.float32)
    assert model._fastllm_prequantized.scheme == "int4" and model._fastllm_prequantized.group_size == 64
    # The model's own weights are the GPTQ formula's values, exactly (fastllm's codes are GPTQ's q, zero 8)
    for name, expected in dequantized.items():
        assert torch.equal(model.get_submodule(name).weight, expected), name
    fastllm.optimize(model)
    layers = fastllm.explain(model).graph.quantized_layers
    assert len(layers) == 8 and set(layers.values()) == {"int4-g64"}
    with torch.no_grad():
        expected_logits, got = original(IDS).logits, model(IDS).logits
    assert float(10 * torch.log10(expected_logits.pow(2).mean() / (expected_logits - got).pow(2).mean())) > 12


def test_gptq_with_zero_points_loads_them(tmp_path, no_requantizing):
    original = _float_model(tmp_path)
    dequantized = _write_gptq_checkpoint(original, tmp_path, zero=6)  # every zero 7: asymmetric
    model = load_prequantized(str(tmp_path), dtype=torch.float32)
    assert model._fastllm_prequantized.zero_point
    for name, expected in dequantized.items():
        assert torch.equal(model.get_submodule(name).weight, expected), name
    fastllm.optimize(model)
    assert set(fastllm.explain(model).graph.quantized_layers.values()) == {"int4-g64-zp"}


def _sqnr_db(expected: torch.Tensor, got: torch.Tensor) -> float:
    return float(10 * torch.log10(expected.pow(2).mean() / (expected - got).pow(2).mean()))


def test_act_order_gptq_loads_without_requantizing(tmp_path, no_requantizing):
    """desc_act: the codes are regrouped by g_idx (exactly: the model's own weights are the file's formula in the
    natural channel order), the merged QKV / gate-up linears share their parts' order, and the quantized step
    gathers x into it: the logits are those of Hugging Face's forward on the dequantized weights, before and after
    the float weights are let go."""
    original = _float_model(tmp_path)
    dequantized = _write_gptq_checkpoint(original, tmp_path, group_size=32, act_order=True)
    model = load_prequantized(str(tmp_path), dtype=torch.float32)
    prequantized = model._fastllm_prequantized
    assert set(prequantized.input_orders) == set(dequantized)
    for name, expected in dequantized.items():
        assert torch.equal(model.get_submodule(name).weight, expected), name
    with torch.no_grad():
        hf_logits = model(IDS).logits
        hf_loss = model(IDS, labels=IDS).loss
    fastllm.optimize(model)
    layers = fastllm.explain(model).graph.quantized_layers
    assert len(layers) == 8 and set(layers.values()) == {"int4-g32"}  # q+k+v and gate+up merged, each quantized
    with torch.no_grad():
        got = model(IDS).logits
        loss = model(IDS, labels=IDS).loss  # Hugging Face's forward, on the quantized modules
    assert _sqnr_db(hf_logits, got) > 90  # the same weights; fp32 sums in another order (a wrong order: ~0 dB)
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-5)
    assert _sqnr_db(original(IDS).logits.detach(), got) > 12  # and near the float model, as without act-order


def test_act_order_parts_in_different_orders_run_unquantized(tmp_path, no_requantizing):
    original = _float_model(tmp_path)
    _write_gptq_checkpoint(original, tmp_path, act_order=True, seeds={"model.layers.0.self_attn.k_proj": 1})
    model = load_prequantized(str(tmp_path), dtype=torch.float32)
    with torch.no_grad():
        hf_logits = model(IDS).logits
    fastllm.optimize(model)
    layers = fastllm.explain(model).graph.quantized_layers
    merged = "model.layers.0.self_attn.q_proj+model.layers.0.self_attn.k_proj+model.layers.0.self_attn.v_proj"
    assert layers[merged] == "not quantized: its parts hold their input channels in different act-orders"
    assert sum(v == "int4-g64" for v in layers.values()) == 7
    with torch.no_grad():
        assert _sqnr_db(hf_logits, model(IDS).logits) > 90


def test_g_idx_that_is_not_gptqs_is_refused(tmp_path):
    _write_gptq_checkpoint(_float_model(tmp_path), tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.g_idx"
    state[name] = torch.zeros_like(state[name])  # every channel in group 0
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="g_idx's groups must hold 64 input channels each"):
        load_prequantized(str(tmp_path))
    state[name] = torch.full_like(state[name], 99)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="g_idx must name one of the 8 groups for each of the 512 input channels"):
        load_prequantized(str(tmp_path))


# --- AWQ ----------------------------------------------------------------------------------------------------------

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's GEMM packing: output channel 8c + AWQ_ORDER[i] in nibble i of column c


def _awq_words(values_rows_n: torch.Tensor) -> torch.Tensor:
    """[rows, N] nibble values -> [rows, N / 8] int32 words in AWQ's order."""
    rows, n = values_rows_n.shape
    blocks = values_rows_n.long().reshape(rows, n // 8, 8)
    words = sum(blocks[:, :, AWQ_ORDER[i]] << (4 * i) for i in range(8))
    return words.to(torch.int32).contiguous()


def _write_awq_checkpoint(model, path, group_size=32):
    """AWQ's GEMM layout from fastllm's own int4 with zero points (fp16 scales); returns the dequantized weights the
    file holds by AWQ's formula (q - z) * s, computed here from the file's tensors."""
    from fastllm.quant.int_weight import quantize_int4, unpack_int4

    state = {name: t.clone() for name, t in model.state_dict().items()}
    dequantized = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        packed, scales, zeros = quantize_int4(module.weight.detach(), group_size, zero_point=True)
        q = (unpack_int4(packed).long() + 8).t()  # [K, N]
        z = zeros.long().t()  # [K / g, N]
        scales16 = scales.half().t().contiguous()  # [K / g, N]
        del state[f"{name}.weight"]
        state.update({f"{name}.qweight": _awq_words(q), f"{name}.qzeros": _awq_words(z), f"{name}.scales": scales16})
        dequantized[name] = ((q - z.repeat_interleave(group_size, 0)).float()
                             * scales16.float().repeat_interleave(group_size, 0)).t()
    save_file(state, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                     "version": "gemm"}
    (path / "config.json").write_text(json.dumps(config))
    return dequantized


def test_awq_checkpoint_loads_as_int4_with_zero_points(tmp_path, no_requantizing):
    original = _float_model(tmp_path)
    dequantized = _write_awq_checkpoint(original, tmp_path)
    model = load_prequantized(str(tmp_path), dtype=torch.float32)
    for name, expected in dequantized.items():
        assert torch.equal(model.get_submodule(name).weight, expected), name
    fastllm.optimize(model)
    assert set(fastllm.explain(model).graph.quantized_layers.values()) == {"int4-g32-zp"}
    with torch.no_grad():
        expected_logits, got = original(IDS).logits, model(IDS).logits
    assert float(10 * torch.log10(expected_logits.pow(2).mean() / (expected_logits - got).pow(2).mean())) > 12
    with fastllm.LLM(str(tmp_path)) as llm:  # the path route, and decode through the int4 kernel's reference
        out = llm.generate([IDS[0].tolist()], fastllm.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                           use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def _write_block_fp8_checkpoint(model, path, block=(128, 128)):
    """transformers' "fp8" method (FineGrainedFP8): `<layer>.weight` float8 e4m3 and `<layer>.weight_scale_inv`
    [ceil(N / bn), ceil(K / bk)], each block's largest magnitude mapped to 448; every Linear but lm_head. Returns
    {layer: dequantized weight} as written."""
    state = {name: t.clone() for name, t in model.state_dict().items()}
    written = {}
    bn, bk = block
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        w = module.weight.detach()
        n, k = w.shape
        tiles = torch.nn.functional.pad(w, (0, -k % bk, 0, -n % bn)).reshape(-(-n // bn), bn, -(-k // bk), bk)
        scale_inv = tiles.abs().amax(dim=(1, 3)) / fp8.FP8_MAX
        expanded = scale_inv.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        q = (w / expanded).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8)
        state[f"{name}.weight"], state[f"{name}.weight_scale_inv"] = q, scale_inv.float()
        written[name] = q.float() * expanded
    save_file(state, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block), "modules_to_not_convert": ["lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    return written


def test_block_wise_fp8_checkpoint_loads_as_it_is_and_runs_its_blocks(tmp_path, no_requantizing):
    """transformers' block-wise FP8: the blocks are used as written (never re-quantized), every layer and the
    compiled step compute with exactly the dequantized blocks, and Hugging Face's forward after optimize() too."""
    written = _write_block_fp8_checkpoint(_float_model(tmp_path), tmp_path)
    with pytest.warns(RuntimeWarning, match="block-wise FP8 checkpoint"):
        model = load_prequantized(str(tmp_path), dtype=torch.float32)
    q, scale_inv = model._fastllm_prequantized.layers["model.layers.1.mlp.down_proj"]
    assert q.dtype == fp8.FP8 and scale_inv.shape == (2, 4)  # [256 / 128, 512 / 128]
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, written["model.layers.1.mlp.down_proj"])
    reference = _float_model(tmp_path / "again")  # the same float model, its weights replaced by the blocks
    reference.load_state_dict({**reference.state_dict(), **{f"{n}.weight": w for n, w in written.items()}})
    with torch.no_grad():
        expected = reference(IDS).logits
    fastllm.optimize(model)
    layers = fastllm.explain(model).graph.quantized_layers
    assert len(layers) == 8 and set(layers.values()) == {"fp8-block128x128"}
    with torch.no_grad():
        got = model(IDS).logits
        eager = model(IDS, use_cache=True).logits  # HF's forward, on the quantized modules (float weights let go)
    assert model.model.layers[1].mlp.down_proj.weight.numel() == 0
    # fp32 on the CPU: the dequantized blocks are the weights in both; paged attention's reference sums in another
    # order than SDPA (1e-5, as in test_parity.py)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager, expected, rtol=1e-5, atol=1e-5)


def test_block_wise_fp8_layers_the_blocks_do_not_tile_run_dequantized_and_bad_configs_are_refused(tmp_path):
    # 256 x 128 blocks tile every weight but the 128-row K/V projections, whose one block is partial: those run
    # their dequantized weights, and so QKV (merged with them) stays in the model's dtype, reported so
    written = _write_block_fp8_checkpoint(_float_model(tmp_path), tmp_path, block=(256, 128))
    with pytest.warns(RuntimeWarning, match=r"do not tile run their dequantized weights .*k_proj \(128, 256\)"):
        model = fastllm.optimize(load_prequantized(str(tmp_path), dtype=torch.float32))
    layers = fastllm.explain(model).graph.quantized_layers
    qkv = "model.layers.0.self_attn.q_proj+model.layers.0.self_attn.k_proj+model.layers.0.self_attn.v_proj"
    assert layers[qkv].startswith("not quantized: the checkpoint quantized only some parts")
    assert layers["model.layers.0.self_attn.o_proj"] == layers["model.layers.1.mlp.down_proj"] == "fp8-block256x128"
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"):  # partial block: true size
        assert torch.equal(model.get_submodule(name).weight, written[name])
    for bad in ({"activation_scheme": "static", "weight_block_size": [128, 128]}, {"weight_block_size": None},
                {"weight_block_size": [128]}):
        with pytest.raises(ValueError, match="FP8 checkpoint with activation_scheme"):
            checkpoint_scheme({"quant_method": "fp8", **bad})


def _with_kv_scales(path, k_scale: float, v_scale: float, layers: int = 2):
    """Add compressed-tensors' kv_cache_scheme and per-layer `self_attn.k_scale` / `v_scale` to a written
    checkpoint."""
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    for i in range(layers):
        state[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k_scale)
        state[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(v_scale)
    save_file(state, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                        "dynamic": False, "symmetric": True}
    (path / "config.json").write_text(json.dumps(config))


def _sqnr(ref, x):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean()))


def test_a_checkpoints_kv_cache_scales_run_an_fp8_cache_with_them(tmp_path):
    """compressed-tensors' FP8 KV cache: the checkpoint's per-layer scales reach the attention (its cache stores
    K / k_scale and V / v_scale). A power-of-two scale changes no e4m3 mantissa: the logits stay those of the
    unscaled FP8 cache (up to the subnormals and saturation it moves); a wild scale visibly costs precision."""
    logits = {}
    for name, scales in (("unscaled", None), ("half", (0.5, 0.5)), ("wild", (300.0, 300.0))):
        path = tmp_path / name
        _write_fp8_checkpoint(_float_model(path), path)
        if scales is not None:
            _with_kv_scales(path, *scales)
            model = fastllm.optimize(load_prequantized(str(path), dtype=torch.float32))
            assert model._fastllm_state.engine().runner.compiled.context.kv_scales == [scales] * 2
        else:
            model = fastllm.optimize(load_prequantized(str(path), dtype=torch.float32),
                                     quantization=fastllm.QuantConfig(weights=None, kv_cache="fp8"))
        assert model._fastllm_state.engine().runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
        with torch.no_grad():
            logits[name] = model(IDS).logits
    print({name: _sqnr(logits["unscaled"], x) for name, x in logits.items() if name != "unscaled"})
    assert _sqnr(logits["unscaled"], logits["half"]) > 40
    assert _sqnr(logits["unscaled"], logits["wild"]) < _sqnr(logits["unscaled"], logits["half"]) - 10


def test_bad_kv_cache_schemes_and_scales_are_refused(tmp_path):
    path = tmp_path / "ckpt"
    _write_fp8_checkpoint(_float_model(path), path)
    _with_kv_scales(path, 0.5, float("nan"))
    with pytest.raises(ValueError, match="KV cache scales must be finite and positive"):
        load_prequantized(str(path), dtype=torch.float32)
    dynamic = _compressed_tensors_config("channel", None)
    dynamic["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "head", "dynamic": True}
    with pytest.raises(ValueError, match="KV cache scheme .* is not supported"):
        checkpoint_scheme(dynamic)


def test_computed_kv_scales_run_beside_a_checkpoint_without_them_and_never_replace_its_own(tmp_path):
    auto = fastllm.QuantConfig(weights=None, kv_cache="fp8", kv_scales="auto")
    plain = tmp_path / "plain"
    _write_fp8_checkpoint(_float_model(plain), plain)
    model = fastllm.optimize(load_prequantized(str(plain), dtype=torch.float32), quantization=auto)
    runner = model._fastllm_state.engine().runner
    assert runner.kv_caches[0][0].dtype == torch.float8_e4m3fn and len(runner.compiled.context.kv_scales) == 2
    assert set(fastllm.explain(model).graph.quantized_layers.values()) == {"fp8"}  # the checkpoint's weights
    scaled = tmp_path / "scaled"
    _write_fp8_checkpoint(_float_model(scaled), scaled)
    _with_kv_scales(scaled, 0.5, 0.5)
    with pytest.raises(ValueError, match="carries its own FP8 KV cache scales; kv_scales='auto' cannot replace"):
        fastllm.optimize(load_prequantized(str(scaled), dtype=torch.float32), quantization=auto)
