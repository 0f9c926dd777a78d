"""Two quantization defects, each as a test that failed before its fix:

- MoE models (Mixtral, ...): `quantization=` quantized the router (the small linear whose logits pick each token's
  experts: a flipped top-k changes which experts run) and nothing else of the MoE block, since the experts are 3-D
  parameters in transformers 5 that the quantize pass never meets; explain() listed the router as quantized and said
  nothing of the experts. Routers now keep the model's dtype (declared per family in fastllm/models/experts.py), and
  explain() lists them and the experts as not quantized, with why.
- GPTQ / AWQ checkpoints of GPT-2: GPTQ quantizes a Conv1D as the Linear it is (its tensors those of the transposed
  weight [N, K]); the loader gave the Conv1D [N, K] where it holds [K, N], so load_state_dict failed, and a square
  layer (attn.c_proj) would have loaded transposed.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers as T
from _models import build, optimize
from safetensors.torch import save_file
from test_quant_checkpoints import _awq_words
from transformers.pytorch_utils import Conv1D

import fastllm
from fastllm import QuantConfig
from fastllm.models.experts import MOE
from fastllm.passes import quantize as quantize_pass
from fastllm.quant import load_prequantized
from fastllm.quant.int_weight import quantize_int4, unpack_int4

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 17, 19]])


def _sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).mean() / (reference - approx).pow(2).mean()))


# -- MoE routers -----------------------------------------------------------------------------------------------------

def _mixtral(path, seed=0):
    return build("mixtral", path, seed=seed)


ROUTERS = [f"model.layers.{i}.mlp.gate" for i in range(2)]  # transformers 5's name (4.x: block_sparse_moe.gate)
EXPERTS = [f"model.layers.{i}.mlp.experts" for i in range(2)]


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_mixtral_routers_stay_in_the_models_dtype_and_explain_says_why(tmp_path, scheme):
    reference = _mixtral(tmp_path)
    with torch.no_grad():
        expected = reference(IDS).logits
    router_weight = reference.model.layers[0].mlp.gate.weight.detach().clone()
    model = optimize(_mixtral(tmp_path), quantization=QuantConfig(scheme, group_size=32), graph_cache=False)
    report = fastllm.explain(model)
    layers = report.graph.quantized_layers
    label = QuantConfig(scheme, group_size=32).label
    # QKV (merged) and o_proj per layer quantized; the routers kept, each with its reason (they were "int8")
    assert sorted(v for v in layers.values() if not v.startswith("not quantized")) == [label] * 4
    for name in ROUTERS:
        assert layers[name].startswith("not quantized: MoE router, kept in float32"), layers[name]
    assert "its outputs choose and weigh each token's experts" in layers[ROUTERS[0]]
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router_weight)  # its float weight, not let go
    with torch.no_grad():
        got = model(IDS).logits
    assert _sqnr(expected, got) > 12
    text = str(report)
    assert "model.layers.0.mlp.gate" in text and "MoE router, kept in float32" in text


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_a_mixtral_whose_other_linears_are_excluded_runs_exactly_as_unquantized(tmp_path, scheme):
    """With the attention projections excluded, the routers were the only linears quantized, and the compiled step's
    logits moved (int8 by 3e-5, int4 and fp8 by 3e-2: 30-34 dB from the float model's), each token's expert weights
    with them. Now nothing is quantized: the step computes exactly what the unquantized step does."""
    with torch.no_grad():
        expected = optimize(_mixtral(tmp_path / "float"), graph_cache=False)(IDS).logits
    attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    model = optimize(_mixtral(tmp_path), graph_cache=False,
                     quantization=QuantConfig(scheme, group_size=32, exclude=("lm_head", *attention)))
    assert fastllm.explain(model).forward_calls == {}
    with torch.no_grad():
        got = model(IDS).logits
    assert fastllm.explain(model).forward_calls == {"compiled": 1}  # the compiled step, not Hugging Face's forward
    assert torch.equal(got, expected)


def test_mixtral_experts_are_listed_as_not_quantized(tmp_path):
    """The experts (3-D parameters: one matrix per expert) were listed nowhere, so explain() showed a fully quantized
    model whose largest weights all ran in float."""
    model = optimize(_mixtral(tmp_path), quantization="int8", graph_cache=False)
    report = fastllm.explain(model)
    layers = report.graph.quantized_layers
    for name in EXPERTS:
        assert layers[name] == ("not quantized: 4 experts' weights (down_proj [4, 64, 96], gate_up_proj [4, 192, 64]: "
                                "3-D, one matrix per expert) run in float32; fastllm quantizes 2-D linear weights "
                                "only"), layers[name]
    assert "quantized layers: int8 ×4, not quantized ×4" in str(report)
    # And they are what the text says: float, untouched
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32


def test_an_explicit_exclude_of_a_router_is_no_typo(tmp_path):
    # the routers are linears of the model: naming one in exclude must not warn "names none of the linear layers"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*exclude entries")
        model = optimize(_mixtral(tmp_path), graph_cache=False,
                         quantization=QuantConfig("int8", exclude=("lm_head", "mlp.gate")))
    assert fastllm.explain(model).graph.quantized_layers[ROUTERS[0]].startswith("not quantized: MoE router")


def test_an_moe_family_without_a_router_entry_is_warned_about(tmp_path, monkeypatch):
    """A MoE model_type missing from the table would have its routers quantized without a word."""
    monkeypatch.delitem(MOE, "mixtral")
    with pytest.warns(RuntimeWarning, match=r"'mixtral' is a mixture-of-experts model .* its routers are quantized"):
        model = optimize(_mixtral(tmp_path), quantization="int8", graph_cache=False)
    assert fastllm.explain(model).graph.quantized_layers[ROUTERS[0]] == "int8"  # as the warning says


def _tiny_moe(model_type: str):
    """A tiny random model of an MoE family, from its config class's defaults shrunk (2 layers, 4 experts)."""
    config = T.AutoConfig.for_model(model_type)
    small = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128, head_dim=16, num_experts=4,
                 num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32,
                 first_k_dense_replace=0, n_group=1, topk_group=1, kv_lora_rank=16, qk_rope_head_dim=8,
                 qk_nope_head_dim=8, v_head_dim=16)
    for key, value in small.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_each_declared_moe_family_names_its_routers_and_experts(model_type):
    """The table is data about transformers' modules: each entry must name, in every MoE layer of that family, a
    router (a 2-D weight with one row per expert, or one row: a shared expert's gate) and experts (3-D weights), or
    the pass keeps nothing (a renamed module would silently quantize the router again)."""
    model = _tiny_moe(model_type)
    layout = MOE[model_type]
    modules = dict(model.named_modules())
    experts = [name for name in modules if any(name.endswith("." + s) for s in layout.experts)]
    assert experts, f"no module named {layout.experts}"
    for name in experts:
        weights = [p for p in modules[name].parameters(recurse=False) if p.dim() == 3]  # (gpt-oss adds 2-D biases)
        assert weights, f"{name} holds no 3-D expert weights"
        block, num_experts = name.rsplit(".", 1)[0], weights[0].shape[0]
        routers = [n for n in modules if n.startswith(block + ".") and any(n.endswith("." + s) for s in layout.routers)]
        assert routers, f"{block}: no router among {layout.routers}"
        for router in routers:
            weight = modules[router].weight
            assert weight.dim() == 2 and weight.shape[0] in (num_experts, 1), (router, weight.shape)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "phimoe"])
def test_other_moe_families_keep_their_routers(model_type, tmp_path):
    """Qwen2-MoE's routers and shared-expert gates (mlp.gate, mlp.shared_expert_gate), PhiMoE's (mlp.router): other
    names than Mixtral's, kept all the same."""
    model = _tiny_moe(model_type)
    names = [n for n, _ in model.named_modules() if any(n.endswith("." + s) for s in MOE[model_type].routers)]
    optimize(model, quantization="int8", graph_cache=False)
    layers = fastllm.explain(model).graph.quantized_layers
    assert len(names) >= 2 and all(layers[n].startswith("not quantized: MoE router") for n in names), layers
    assert any(v == "int8" for v in layers.values())


# -- GPT-2 GPTQ / AWQ checkpoints ------------------------------------------------------------------------------------

def _conv1ds(model):
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Conv1D)]


def _write_gpt2_gptq(model, path, group_size=32):
    """GPTQ's layout for GPT-2's Conv1Ds, as AutoGPTQ writes it: the layer quantized as a Linear of in-features
    weight.shape[0] and out-features weight.shape[1] (its weight transposed, [N, K]), so `qweight` int32 [K/8, N],
    `qzeros` [K/g, N/8] (symmetric: zero - 1 = 7), `scales` fp16 [K/g, N], `g_idx` [K]. Returns the dequantized
    weights the file holds, in the Conv1D's layout [K, N] (GPTQ's formula from the file's tensors)."""
    state = {name: t.clone() for name, t in model.state_dict().items()}
    dequantized = {}
    for name, module in _conv1ds(model):
        w = module.weight.detach().t()  # [N, K]
        n, k = w.shape
        packed, scales = quantize_int4(w, group_size)
        q = (unpack_int4(packed).long() + 8).t()  # [K, N], codes 0..15
        scales16 = scales.half().t().contiguous()  # [K / g, N]
        words = (q.reshape(k // 8, 8, n) << (4 * torch.arange(8))[None, :, None]).sum(1)
        del state[f"{name}.weight"]
        state.update({f"{name}.qweight": words.to(torch.int32),
                      f"{name}.qzeros": torch.full((k // group_size, n // 8), 7 * 0x11111111).to(torch.int32),
                      f"{name}.scales": scales16, f"{name}.g_idx": torch.arange(k, dtype=torch.int32) // group_size})
        dequantized[name] = (q - 8).float() * scales16.float().repeat_interleave(group_size, 0)  # [K, N]
    _save(state, path, {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": True,
                        "desc_act": False, "checkpoint_format": "gptq"})
    return dequantized


def _write_gpt2_awq(model, path, group_size=32):
    """AWQ's GEMM layout for GPT-2's Conv1Ds (the Linear of the transposed weight): `qweight` [K, N/8], `qzeros`
    [K/g, N/8], `scales` [K/g, N]. Returns the dequantized weights in the Conv1D's layout [K, N]."""
    state = {name: t.clone() for name, t in model.state_dict().items()}
    dequantized = {}
    for name, module in _conv1ds(model):
        packed, scales, zeros = quantize_int4(module.weight.detach().t(), group_size, zero_point=True)
        q = (unpack_int4(packed).long() + 8).t()  # [K, N]
        z = zeros.long().t()  # [K / g, N]
        scales16 = scales.half().t().contiguous()
        del state[f"{name}.weight"]
        state.update({f"{name}.qweight": _awq_words(q), f"{name}.qzeros": _awq_words(z), f"{name}.scales": scales16})
        dequantized[name] = ((q - z.repeat_interleave(group_size, 0)).float()
                             * scales16.float().repeat_interleave(group_size, 0))
    _save(state, path, {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                        "version": "gemm"})
    return dequantized


def _save(state, path, quantization_config):
    save_file(state, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))


def _refuse_requantizing(monkeypatch):
    monkeypatch.setattr(quantize_pass, "quantized_tensors",
                        lambda *a, **k: pytest.fail("a pre-quantized checkpoint must not be quantized again"))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_gpt2_int4_checkpoint_loads_its_conv1ds_and_runs_them_quantized(tmp_path, monkeypatch, method):
    """Loading failed in load_state_dict (size mismatch [N, K] vs [K, N]); GPT-2's attn.c_proj is square, so a fix by
    shape alone would load it transposed. Now every Conv1D holds GPTQ's / AWQ's dequantized weight exactly, in its
    own layout, and the quantize pass runs the checkpoint's tensors (never re-quantized)."""
    original = build("gpt2", tmp_path)
    assert original.transformer.h[0].attn.c_proj.weight.shape == (64, 64)  # square: the case shapes cannot tell
    write = _write_gpt2_gptq if method == "gptq" else _write_gpt2_awq
    dequantized = write(original, tmp_path)
    model = load_prequantized(str(tmp_path), dtype=torch.float32)
    for name, expected in dequantized.items():
        assert torch.equal(model.get_submodule(name).weight, expected), name
    with torch.no_grad():
        hf_logits = model(IDS).logits  # Hugging Face's forward, on the dequantized weights
        expected_logits = original(IDS).logits
    assert _sqnr(expected_logits, hf_logits) > 12  # near the float model (a transposed c_proj is ~0 dB)
    _refuse_requantizing(monkeypatch)
    optimize(model, graph_cache=False)
    layers = fastllm.explain(model).graph.quantized_layers
    label = "int4-g32" if method == "gptq" else "int4-g32-zp"
    assert len(layers) == 8 and set(layers.values()) == {label}, layers  # 2 layers x 4 Conv1Ds
    with torch.no_grad():
        got = model(IDS).logits
        eager = model(IDS, use_cache=True).logits  # Hugging Face's forward, on the modules now run quantized
    assert _sqnr(hf_logits, got) > 90  # the same weights (fp32 sums in another order)
    torch.testing.assert_close(eager, got, rtol=1e-5, atol=1e-5)
    assert model.transformer.h[0].attn.c_proj.weight.numel() == 0  # its float weight let go


def test_a_gpt2_gptq_checkpoint_matches_the_same_weights_quantized_by_fastllm(tmp_path, monkeypatch):
    """The file holds fastllm's own symmetric int4 of the float weights (scales rounded to fp16, as GPTQ stores
    them): its logits are those of `quantization=QuantConfig("int4", group_size=32)` on the float model, up to the
    scales' rounding, and greedy decoding gives the same tokens."""
    ours = optimize(build("gpt2", tmp_path / "ours"), graph_cache=False,
                    quantization=QuantConfig("int4", group_size=32))
    _write_gpt2_gptq(build("gpt2", tmp_path), tmp_path)  # same seed: the same float weights
    _refuse_requantizing(monkeypatch)
    loaded = optimize(load_prequantized(str(tmp_path), dtype=torch.float32), graph_cache=False)
    assert fastllm.explain(loaded).graph.quantized_layers == fastllm.explain(ours).graph.quantized_layers
    with torch.no_grad():
        assert _sqnr(ours(IDS).logits, loaded(IDS).logits) > 60  # 75 dB: the fp16 scales are all that differs
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(IDS, **greedy), ours.generate(IDS, **greedy))

