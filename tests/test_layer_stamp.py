"""Layer stamping (capture/layer_stamp.py): a model traced with two of its layers and widened to all of them gives
what the full trace gives, for every family; models whose layers differ are traced in full, and still right."""

import types

import pytest
import torch
import transformers as T

from fastllm.capture import layer_stamp
from fastllm.capture.layer_stamp import find_layer_stack
from tests._models import FAMILIES, VOCAB, optimize

NUM_LAYERS = 4


def _config(family: str, num_layers: int = NUM_LAYERS):
    """The family's tiny config with `num_layers` layers (per-layer lists, such as Gemma-2's alternating
    `layer_types`, rebuilt by the config class for that count)."""
    config = FAMILIES[family]()
    values = config.to_dict()
    values.pop("layer_types", None)
    values[config.attribute_map.get("num_hidden_layers", "num_hidden_layers")] = num_layers
    return type(config)(**values)


def _model(config, seed: int = 0):
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(config).eval()


def _greedy(model, ids):
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                         output_logits=True)
    return out.sequences, torch.stack(out.logits)


def _check_against_eager(model, ids, *, stamped: bool):
    """The optimized model's greedy tokens equal HF eager's on the same weights, its logits within fp32 rounding
    of a different op order (fused kernels' reference paths), and the capture stamped (or not) as expected."""
    expected = _greedy(model, ids)
    optimized = optimize(model, graph_cache=False)
    sequences, logits = _greedy(optimized, ids)
    compiled = optimized._fastllm_state.compiled
    assert compiled.layers_stamped is stamped
    assert torch.equal(sequences, expected[0])
    torch.testing.assert_close(logits, expected[1], rtol=1e-4, atol=1e-4)
    return compiled


# Gemma-2 alternates sliding-window and full-attention layers (config.layer_types): never stamped.
_NOT_STAMPED = {"gemma2"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gives_eager_output_with_its_layers_stamped(family):
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    _check_against_eager(_model(_config(family)), ids, stamped=family not in _NOT_STAMPED)


def test_the_stamped_graph_has_every_layer_reading_its_own_weights():
    """Each layer's weights scaled differently: a stamp that read one layer's weights twice, or skipped a layer,
    would give other logits than eager (the comparison above is made with layers that all matter)."""
    model = _model(_config("llama", 6))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.mul_(1 + i)
            layer.self_attn.o_proj.weight.mul_(1 + 0.5 * i)
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    compiled = _check_against_eager(model, ids, stamped=True)
    assert compiled.report.matches["attention"] == 6


def test_layers_with_an_attribute_of_their_own_are_traced_in_full():
    model = _model(_config("llama"))
    model.model.layers[2].self_attn.scaling *= 0.5  # one middle layer unlike the others
    assert find_layer_stack(model) == (None, "layer 2's attributes differ from layer 0's")
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    _check_against_eager(model, ids, stamped=False)


def test_a_config_list_that_differs_between_layers_refuses_the_stamp():
    model = _model(_config("llama"))
    model.config.no_rope_layers = [1, 1, 0, 1]
    stack, why_not = find_layer_stack(model)
    assert stack is None and why_not == "config.no_rope_layers differs between layers"


def test_layers_of_different_classes_and_shallow_models_are_not_stamped():
    model = _model(_config("llama"))
    model.model.layers[1] = torch.nn.Sequential(*model.model.layers[1].children())
    assert find_layer_stack(model) == (None, "layers of different classes")
    assert find_layer_stack(_model(_config("llama", 2)))[1] == "fewer than three layers (or no num_hidden_layers)"


def test_a_layer_index_used_in_the_arithmetic_refuses_the_stamp_at_trace_time(monkeypatch):
    """A layer whose forward scales by its own index (as ChatGLM's query scaling does) traces to other constants
    in the first and last layers: the capture falls back to the full trace, and the output is eager's."""
    model = _model(_config("llama"))
    for i, layer in enumerate(model.model.layers):
        layer.mlp.layer_idx = i
        forward = type(layer.mlp).forward

        def scaled(self, x, forward=forward):
            return forward(self, x) * (1.0 + 0.25 * self.layer_idx)

        layer.mlp.forward = types.MethodType(scaled, layer.mlp)
    refusals = []
    original = layer_stamp.stamp_layers

    def recording(*args):
        try:
            return original(*args)
        except layer_stamp.StampRefused as error:
            refusals.append(str(error))
            raise

    monkeypatch.setattr("fastllm.capture.dynamo.stamp_layers", recording)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(6))
    _check_against_eager(model, ids, stamped=False)
    assert len(refusals) == 1 and refusals[0].startswith("the two layers differ at")


def test_the_stamped_graph_is_saved_and_a_second_start_loads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLLM_GRAPH_CACHE_DIR", str(tmp_path / "graphs"))
    config = _config("qwen2", 5)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(7))
    expected = _greedy(_model(config), ids)
    first = optimize(_model(config))
    assert first._fastllm_state.compiled.layers_stamped
    assert len(list((tmp_path / "graphs").glob("*.pkl"))) == 1
    second = optimize(_model(config))
    compiled = second._fastllm_state.compiled
    assert compiled.from_graph_cache and not compiled.layers_stamped
    for model in (first, second):
        assert torch.equal(_greedy(model, ids)[0], expected[0])


def test_the_model_keeps_its_layers_after_a_stamped_capture():
    model = _model(_config("mistral"))
    layers = list(model.model.layers)
    optimized = optimize(model, graph_cache=False)
    assert optimized._fastllm_state.compiled.layers_stamped
    assert list(optimized.model.layers) == layers
    import fastllm

    report = fastllm.explain(optimized)
    assert report.startup["layers_stamped"] and "traced with two layers, the others stamped out" in str(report)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mixtral", "falcon", "gpt2"])
def test_on_a_gpu_a_stamped_model_equals_eager_with_cuda_graphs(family):
    """fp32 on CUDA, so the kernels' results are comparable with eager's within a few ulps (as in
    test_gpu_parity); the runtime's decode steps replay CUDA graphs of the stamped graph."""
    model = _model(_config(family)).cuda()
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(8)).cuda()
    expected = _greedy(model, ids)
    import fastllm

    optimized = fastllm.optimize(model, graph_cache=False, num_kv_tokens=4096)
    assert optimized._fastllm_state.compiled.layers_stamped
    sequences, logits = _greedy(optimized, ids)
    assert torch.equal(sequences, expected[0])
    torch.testing.assert_close(logits, expected[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_stamped_model_computes_what_the_full_trace_does(scheme, monkeypatch):
    """The quantize pass names and swaps each layer's weights by the tensors bound to the stamped placeholders:
    the same logits, bit for bit, and the same layers quantized as with every layer traced."""
    config = _config("llama", 5)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(9))
    results = []
    for stamp in (True, False):
        monkeypatch.setattr("fastllm.capture.step.STAMP_LAYERS", stamp)
        optimized = optimize(_model(config), graph_cache=False, quantization=scheme)
        compiled = optimized._fastllm_state.compiled
        assert compiled.layers_stamped is stamp
        with torch.no_grad():
            results.append((optimized(ids).logits, compiled.report.quantized_layers))
    (stamped, stamped_layers), (full, full_layers) = results
    assert stamped_layers == full_layers and len(full_layers) >= 5 * 4
    assert torch.equal(stamped, full)
