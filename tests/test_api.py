"""The public API's contract: options, bad input, capture failure, lean import."""

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fastllm
from tests._models import VOCAB, break_capture, build, optimize


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build("llama", path)
    return path


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_import_does_not_initialise_cuda():
    code = "import torch, fastllm, fastllm.kernels, fastllm.passes; assert not torch.cuda.is_initialized(); print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_config_validation():
    assert fastllm.OptimizeConfig().passes == fastllm.DEFAULT_PASSES
    with pytest.raises(ValueError, match="allowed"):
        fastllm.OptimizeConfig(passes=("rms_norm", "no_such_pass"))
    with pytest.raises(ValueError, match="on_capture_failure"):
        fastllm.OptimizeConfig(on_capture_failure="ignore")
    with pytest.raises(ValueError, match="sequence"):
        fastllm.OptimizeConfig(passes="rms_norm")


def test_unknown_option_names_the_allowed_ones(llama_path):
    model = _load(llama_path)
    with pytest.raises(TypeError, match="unknown option.*colour.*allowed: passes"):
        optimize(model, colour="red")
    with pytest.raises(ValueError, match="warmup"):
        optimize(model, warmup="yes")
    assert not hasattr(model, "_fastllm_state")  # untouched, still usable
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, VOCAB)


def test_not_a_causal_lm():
    module = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="causal language model"):
        optimize(module)
    assert module(torch.ones(1, 4)).shape == (1, 4)


def test_explain_on_unoptimized_model(llama_path):
    with pytest.raises(ValueError, match="not optimized"):
        fastllm.explain(_load(llama_path))


def test_already_optimized(llama_path):
    model = optimize(_load(llama_path))
    with pytest.raises(ValueError, match="already optimized"):
        optimize(model)
    ids = torch.tensor([[5, 6, 7]])
    assert model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (1, 5)


def test_config_object_and_pass_subset(llama_path):
    model = _load(llama_path)
    optimize(model, fastllm.OptimizeConfig(passes=("rms_norm",)), warmup=True)
    report = fastllm.explain(model)
    layers = model.config.num_hidden_layers
    # The runtime always pages attention; skinny_linear only takes 16-bit weights (this model is fp32); on the CPU
    # the norms run their references directly (and so does the attention op: + layers).
    assert report.matches == {"list_index": 0, "rms_norm": 2 * layers + 1, "attention": layers, "quantize": 0,
                              "skinny_linear": 0, "reference_ops": 2 * layers + 1 + layers}
    assert "silu" in report.unfused_ops


def test_without_warmup_captures_on_first_call(llama_path):
    model = optimize(_load(llama_path), warmup=False)
    assert fastllm.explain(model).status == "not captured yet"
    model(torch.tensor([[1, 2]]))
    assert fastllm.explain(model).status == "optimized"


def test_capture_failure_falls_back_with_one_warning(llama_path):
    model = _load(llama_path)
    break_capture(model)
    ids = torch.tensor([[3, 4, 5, 6]])
    expected = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with pytest.warns(RuntimeWarning, match="runs unoptimized"):
        optimize(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not again on each call
        tokens = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, expected)
    report = fastllm.explain(model)
    assert report.status == "fallback"
    assert report.fallback_reason.startswith("Unsupported:")  # dynamo's error type, then its message


def test_capture_failure_can_raise(llama_path):
    model = _load(llama_path)
    break_capture(model)
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        optimize(model, on_capture_failure="raise")


def test_bad_input_raises_and_does_not_disable_optimization(llama_path):
    model = optimize(_load(llama_path))
    with pytest.raises(Exception):
        model(torch.tensor([[1.5, 2.5]]))  # float ids: the same error eager would give
    assert fastllm.explain(model).status == "optimized"


def test_scheduling_defaults_follow_the_card(monkeypatch):
    from types import SimpleNamespace

    from fastllm.config import CPU_DEFAULTS, resolve_scheduling, scheduling_defaults

    assert scheduling_defaults("cpu") == CPU_DEFAULTS
    for gib, expected in ((141, (1024, 16384)), (48, (512, 8192)), (16, (256, 4096))):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, gib=gib: SimpleNamespace(total_memory=gib * 2**30))
        assert scheduling_defaults("cuda") == expected
    given = resolve_scheduling(fastllm.OptimizeConfig(max_num_seqs=8), "cuda")
    assert (given.max_num_seqs, given.max_num_batched_tokens) == (8, 4096)  # what the user gave stays


def test_on_the_cpu_generate_and_forward_take_hfs_path_by_default(llama_path):
    """On the CPU, where HF's own path is faster than the runtime, optimize() leaves generate() and model(...) on
    it and says so; nothing is captured until an LLM needs the runtime."""
    model, reference = fastllm.optimize(_load(llama_path)), _load(llama_path)
    report = fastllm.explain(model)
    assert report.hf_path_reason and "cpu_runtime=True" in report.hf_path_reason
    assert report.status == "not captured yet" and "Hugging Face's path" in str(report)
    ids = torch.tensor([[3, 4, 5, 6]])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    calls = fastllm.explain(model).forward_calls.get("eager", 0)  # HF's generate calls the forward too
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)  # HF's forward itself
    assert fastllm.explain(model).forward_calls == {"eager": calls + 1}
    llm = fastllm.LLM(model)  # the engine always runs the runtime: it captures now
    out = llm.generate([[3, 4, 5, 6]], fastllm.SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference.generate(ids, **kwargs)[0, 4:].tolist()
    assert fastllm.explain(model).status == "optimized"
